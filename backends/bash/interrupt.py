"""Stopping one command of a session's shell without stopping the shell, in every isolation tier.

A command that times out (or whose call is cancelled) must stop, with everything it started,
while the shell and its background jobs from earlier commands live on. Each command runs with
`AGENTFLOW_COMMAND=<n>` exported, so its processes carry that marker and earlier jobs do not.
The marker only *selects* among the session's processes; which processes belong to the session
comes from the sandbox (its cgroup, uid or pid namespace), so a hostile command cannot steer the
kill at anything outside its session by forging the marker.

- `none` / `sandbox`: the host sees the session's processes (host pids, via the sandbox's
  membership and the process tree under the shell's wrapper), so the server reads their
  environment and SIGKILLs the marked ones, then sends SIGINT to the shell's host pid.
- `gvisor`: the session's processes live inside gVisor's own kernel and are invisible to the
  host; a small script run inside the same container (`runsc exec`, as the session's uid) does
  the same there. It costs a runsc start (~0.5 s), paid only on a timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from pathlib import Path

import anyio
from anyio.abc import Process

from backends.processes import descendants, kill_pids
from backends.sandbox import SessionSandbox
from backends.sandbox.gvisor import runsc_path

log = logging.getLogger(__name__)

COMMAND_ENV = "AGENTFLOW_COMMAND"
#: How long the marked processes of a command (a fork bomb keeps making more) are hunted.
KILL_WITHIN = 2.0
#: Environment of host-side helpers (never the server's or the session's).
HOST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
#: Run inside a gVisor container as `sh -c SCRIPT sh <marker>`: interrupt the shell (pid 1; its
#: trap runs once its foreground child is gone), then kill the marked processes (a few rounds,
#: for commands that are still forking).
GVISOR_SCRIPT = r"""
kill -INT 1
for round in 1 2 3 4 5; do
  found=
  for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    [ "$pid" = "$$" ] && continue
    if tr '\0' '\n' < "$dir/environ" 2>/dev/null | grep -qxF "$1"; then kill -9 "$pid" 2>/dev/null; found=1; fi
  done
  [ -z "$found" ] && break
done
"""


def _environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return b"\0" + fh.read()
    except OSError:
        return b""


class Interrupter:
    """Finds and stops the processes of one command of the shell `process` inside `sandbox`."""

    def __init__(self, sandbox: SessionSandbox, process: Process) -> None:
        self.sandbox = sandbox
        self.process = process
        self._shell_pid: int | None = None
        # gVisor: the container this shell runs in (the sandbox names one per spawn, in order).
        containers: list[str] = getattr(sandbox, "_containers", [])
        self._container = containers[-1] if sandbox.tier == "gvisor" and containers else None

    def shell_pid(self) -> int | None:
        """The shell's host pid (gVisor: the runsc process, the shell's host-side stand-in)."""
        if self._shell_pid is None:
            self._shell_pid = self.sandbox.inner_pid(self.process)
        return self._shell_pid

    async def interrupt(self, command_tag: str) -> None:
        """SIGKILL every process of command `command_tag`, and SIGINT the shell. Never raises."""
        if self.process.returncode is not None:
            return
        marker = f"{COMMAND_ENV}={command_tag}"
        try:
            if self.sandbox.tier == "gvisor":
                await self._interrupt_in_gvisor(marker)
            else:
                await self._interrupt_on_host(marker)
        except Exception:
            log.exception("sandbox %s: interrupting a command failed", self.sandbox.spec.label)

    async def _interrupt_on_host(self, marker: str) -> None:
        shell = self.shell_pid()
        if shell is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(shell, signal.SIGINT)
        needle = b"\0" + marker.encode() + b"\0"
        with anyio.move_on_after(KILL_WITHIN):
            while True:
                members = set(self.sandbox.pids()) | set(descendants(self.process.pid))
                marked = [pid for pid in members if needle in _environ(pid) + b"\0"]
                if not marked:
                    return
                kill_pids(marked)
                await anyio.sleep(0.005)

    async def _interrupt_in_gvisor(self, marker: str) -> None:
        state: Path | None = getattr(self.sandbox, "_gvisor_state", None)
        runsc = runsc_path()
        if state is None or self._container is None or runsc is None:
            log.warning("sandbox %s: no gVisor container to interrupt", self.sandbox.spec.label)
            return
        uid = str(self.sandbox.uid)
        argv = [runsc, "--root", str(state), "exec", "--user", f"{uid}:{uid}", self._container]
        argv += ["/bin/sh", "-c", GVISOR_SCRIPT, "sh", marker]
        with anyio.move_on_after(10):
            result = await anyio.run_process(
                argv, env=HOST_ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=False
            )
            if result.returncode != 0:
                log.warning("sandbox %s: runsc exec answered %d", self.sandbox.spec.label, result.returncode)
