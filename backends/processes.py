"""Process ownership for sessions: spawn in a fresh process group, tag, and kill it all.

Every process a session starts carries `AGENTFLOW_SESSION=<tag>` in its environment.
Descendants inherit it, so `ProcessGroupOwner.aclose` can find and kill even the ones
that left the process group (`setsid`, daemons) or were re-parented to init.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import psutil
from anyio.abc import Process

log = logging.getLogger(__name__)

SESSION_ENV_MARKER = "AGENTFLOW_SESSION"
#: The pid of the server that started a process: lets a restarted server find what a
#: crashed one (SIGKILL, OOM) left behind. See `sweep_orphans`.
SERVER_ENV_MARKER = "AGENTFLOW_SERVER"


def _read_proc(pid: str, name: str) -> bytes:
    try:
        fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY)
    except OSError:
        return b""
    try:
        return os.read(fd, 1 << 20)
    except OSError:
        return b""
    finally:
        os.close(fd)


def pids_with_marker(tag: str, *, cmdline_token: str | None = None) -> list[int]:
    """PIDs of live processes whose environment carries `AGENTFLOW_SESSION=<tag>` exactly.

    `cmdline_token` also matches processes with that exact word on their command line:
    some programs (Chromium's helpers) overwrite their environ area with their process
    title, so a unique argument they all carry is the only trace left.
    Raw /proc reads, not psutil: this runs on every session's cleanup, and matching bytes
    skips decoding every environment into a dict. Measured (2 cores, 143 processes, median
    of 200 scans): 0.64 ms per scan here vs 7.8 ms through `psutil.Process.environ()`.
    """
    needle = f"\0{SESSION_ENV_MARKER}={tag}\0".encode()
    token = f"\0{cmdline_token}\0".encode() if cmdline_token else None
    me = str(os.getpid())
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        if needle in b"\0" + _read_proc(pid, "environ") or (
            token is not None and token in b"\0" + _read_proc(pid, "cmdline")
        ):
            found.append(int(pid))
    return found


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (children first), read from /proc.

    Raw /proc reads, not `psutil.Process.children(recursive=True)`: this runs when a bash
    command is interrupted, between the shell's SIGINT and the SIGKILL of the command's
    processes, where every millisecond widens a race. Measured (157 processes, median of
    200 walks, machine under load): 44 ms here vs 62 ms through psutil.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read_proc(entry, "stat")
        if not stat:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = stat.rsplit(b")", 1)[-1].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    stack = list(children.get(pid, []))
    while stack:
        child = stack.pop()
        out.append(child)
        stack.extend(children.get(child, []))
    return out


def kill_pids(pids: Sequence[int], sig: signal.Signals = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def session_env(tag: str, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """An environment for a session's process: `base` (default: ours) plus the marker."""
    env = dict(os.environ if base is None else base)
    env.update(extra)
    env[SESSION_ENV_MARKER] = tag
    env[SERVER_ENV_MARKER] = str(os.getpid())
    return env


#: Written into every scratch directory a session makes: the PID of the server owning it.
OWNER_FILE = ".agentflow-server"


def make_scratch_dir(prefix: str) -> Path:
    """A private temporary directory (`agentflow-...`) that names its owning server.

    The caller deletes it with its session; `sweep_orphan_dirs` deletes the ones a
    server killed outright could not.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    (path / OWNER_FILE).write_text(str(os.getpid()))
    return path


def _owner_pid(entry: Path) -> str | None:
    """The pid of the server owning a scratch root: `agentflow-<run>-<pid>-<hex>`, or an owner file."""
    parts = entry.name.split("-")
    if len(parts) >= 4 and parts[-2].isdigit():
        return parts[-2]
    try:
        return (entry / OWNER_FILE).read_text().strip()
    except OSError:
        return None


def sweep_orphan_dirs() -> list[Path]:
    """Delete scratch directories whose owning server no longer exists; returns them."""
    removed = []
    for entry in Path(tempfile.gettempdir()).glob("agentflow-*"):
        owner = _owner_pid(entry)
        if owner is not None and owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def sweep_orphans() -> list[int]:
    """Kill session processes whose server is gone; returns their PIDs.

    A server killed outright (SIGKILL, the OOM killer) cannot clean up; its sessions'
    processes keep `AGENTFLOW_SERVER=<its pid>`. A server calls this at start: any
    process naming a server PID that no longer exists is an orphan. Processes of live
    servers are never touched.
    """
    orphans: list[int] = []
    me = os.getpid()
    for proc in psutil.process_iter(["environ"]):  # once per server start: clarity over speed
        owner = (proc.info["environ"] or {}).get(SERVER_ENV_MARKER, "")
        if proc.pid != me and owner.isdigit() and not psutil.pid_exists(int(owner)):
            orphans.append(proc.pid)
    kill_pids(orphans)
    return orphans


class ProcessGroupOwner:
    """Owns every process one session starts; `aclose` leaves none behind.

    Processes are started with `start_new_session=True` (own process group) and the
    session marker in their environment. Closing sends SIGTERM to each group, waits up
    to `grace` seconds, then SIGKILLs the groups and sweeps /proc for anything still
    carrying the marker.
    """

    def __init__(self, tag: str, *, grace: float = 1.0) -> None:
        self.tag = tag
        self.grace = grace
        self.processes: list[Process] = []
        self.closed = False

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        **kwargs: Any,
    ) -> Process:
        """Start `argv` (never a shell string) in its own process group, tagged with the session."""
        if self.closed:
            raise RuntimeError("session processes already closed")
        process = await anyio.open_process(
            list(argv),
            env=session_env(self.tag, env),
            cwd=cwd,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            **kwargs,
        )
        self.processes.append(process)
        return process

    def pids(self) -> list[int]:
        """Every live process of this session (spawned directly or descended)."""
        live = {p.pid for p in self.processes if p.returncode is None}
        live.update(pids_with_marker(self.tag))
        return sorted(live)

    async def aclose(self) -> None:
        """Terminate everything; safe to call twice; never raises."""
        self.closed = True
        try:
            with anyio.CancelScope(shield=True):
                await self._terminate_all()
        except Exception:
            log.exception("cleaning up processes of session %s", self.tag)

    async def _terminate_all(self) -> None:
        live = [p for p in self.processes if p.returncode is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        with anyio.move_on_after(self.grace):
            for p in live:
                await p.wait()
        for p in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        swept = pids_with_marker(self.tag)
        kill_pids(swept)
        for p in self.processes:
            with anyio.move_on_after(self.grace):
                await p.wait()
            await _close_streams(p)
        self.processes.clear()
        # Swept processes are not our children, so there is nothing to wait on: poll
        # briefly, so that once this returns none of them is still alive.
        with anyio.move_on_after(self.grace):
            while any(_alive(pid) for pid in swept):  # noqa: ASYNC110 - no event exists for another's exit
                await anyio.sleep(0.005)


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a zombie has already died)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def _close_streams(process: Process) -> None:
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.aclose()
