"""One persistent bash process driven over pipes.

Each command is sent as a quoted here-document that the shell `source`s: bash reads it
whole (through a pipe, no temp file) before running it, so quotes can't desync the
protocol, a command reading stdin gets EOF instead of eating the protocol, and `cd`,
variables (even `declare`d ones) and functions persist. After it, the shell prints a
per-shell sentinel with the exit code on stdout and on stderr; the reader stops at the
sentinel, so a round trip costs well under a millisecond.

Interrupting: the shell runs with `trap 'return 130' INT`, re-armed before every
command. On timeout or cancellation it gets SIGINT and the processes the command
started get SIGKILL; `return` inside a sourced file abandons the rest of the command
(even a busy builtin loop), and the sentinel follows. Only if the shell fails to
answer is it killed and restarted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import ByteReceiveStream, Process

from backends.base import ProgressFn
from backends.bash.capture import BoundedCapture, SentinelScanner
from backends.bash.isolation import inner_shell_pid
from backends.processes import ProcessGroupOwner, descendants, kill_pids

log = logging.getLogger(__name__)

#: How long a timed-out command's shell gets to print its sentinel after its children die.
RECOVERY_GRACE = 3.0
#: How often a silent command is checked for shell exit (and progress is due).
IDLE_CHECK = 0.5
COMMAND_ENV = "AGENTFLOW_COMMAND"


@dataclass(slots=True)
class CommandResult:
    stdout: str
    stderr: str
    exit_code: int | None
    truncated: bool
    stdout_bytes: int
    stderr_bytes: int
    duration_ms: float
    timed_out: bool = False
    shell_exited: bool = False
    shell_restarted: bool = False


class PersistentShell:
    """A bash process kept alive across commands; restartable if it dies."""

    def __init__(
        self,
        owner: ProcessGroupOwner,
        *,
        argv: list[str],
        env: Mapping[str, str],
        cwd: str,
        max_output_bytes: int,
        progress_interval: float = 5.0,
        isolated: bool = False,
        shell_name: str = "bash",
    ) -> None:
        self.owner = owner
        self.isolated = isolated
        self.shell_name = shell_name
        self._inner_pid: int | None = None
        self.progress_interval = progress_interval
        self.heredoc_end = f"__AF_END_{uuid.uuid4().hex}"
        self.argv = argv
        self.env = dict(env)
        self.cwd = cwd
        self.max_output_bytes = max_output_bytes
        self.marker = f"__AF_{uuid.uuid4().hex}_"
        self.process: Process | None = None
        self._scanners: tuple[SentinelScanner, SentinelScanner] | None = None
        self.restarts = 0
        self.commands_run = 0

    # -- lifetime --------------------------------------------------------------------

    async def start(self) -> None:
        self.process = await self.owner.spawn(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._scanners = (SentinelScanner(self.marker), SentinelScanner(self.marker))

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def shell_pid(self) -> int | None:
        """The bash process itself (under bwrap, a grandchild of the process we spawned)."""
        if self.process is None:
            return None
        if not self.isolated:
            return self.process.pid
        if self._inner_pid is None:
            self._inner_pid = inner_shell_pid(self.process.pid, self.shell_name)
        return self._inner_pid

    async def kill(self) -> None:
        """Kill the shell and everything in its process group.

        Processes that left the group (setsid, daemons) are swept by the session's
        `ProcessGroupOwner` through their environment marker.
        """
        process, self.process = self.process, None
        self._inner_pid = None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            await process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.aclose()

    # -- commands --------------------------------------------------------------------

    async def run(self, command: str, time_limit: float, progress: ProgressFn | None = None) -> CommandResult:
        """Run one command; on timeout the command's processes are killed and the shell kept."""
        restarted = False
        if not self.alive:
            await self.kill()
            await self.start()
            self.restarts += 1
            restarted = True
        assert self.process is not None
        assert self.process.stdin is not None
        pending = _Pending(self.max_output_bytes)
        started = time.monotonic()
        self.commands_run += 1
        command_tag = f"{self.commands_run}"
        sentinel = f"printf '\\n{self.marker}%d__\\n' \"$__af_rc\""
        line = (
            f"trap 'return 130' INT; export {COMMAND_ENV}={command_tag}; "
            f"source /dev/stdin <<'{self.heredoc_end}'\n{command}\n{self.heredoc_end}\n"
            f"__af_rc=$?; {sentinel}; {sentinel} >&2\n"
        )
        timed_out = False
        try:
            await self.process.stdin.send(line.encode("utf-8", "surrogateescape"))
            with anyio.move_on_after(time_limit):
                await self._collect(pending, progress, started)
            if not pending.finished and not pending.exited:
                timed_out = True
                self._kill_command(command_tag)
                with anyio.move_on_after(RECOVERY_GRACE):
                    await self._collect(pending, None, started)
        except BaseException:
            # Cancelled (client gave up, session destroyed) or the pipe broke: stop the
            # command, and drop the shell unless it answers promptly.
            with anyio.CancelScope(shield=True):
                self._kill_command(command_tag)
                with anyio.move_on_after(1.0):
                    await self._collect(pending, None, started)
                if not pending.finished or pending.exited:
                    await self.kill()
            raise
        if not pending.finished:
            assert self._scanners is not None
            for scanner, capture in zip(self._scanners, pending.captures, strict=True):
                scanner.drain(capture)
        exit_code = pending.codes[0]
        exited = pending.exited or not pending.finished or not self.alive
        if exited:
            exit_code = await self._exit_status() if not timed_out else None
            await self.kill()
        out, err = pending.captures
        return CommandResult(
            stdout=out.text(),
            stderr=err.text(),
            exit_code=130 if timed_out and exit_code is None else exit_code,
            truncated=out.truncated or err.truncated,
            stdout_bytes=out.total,
            stderr_bytes=err.total,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
            timed_out=timed_out,
            shell_exited=exited,
            shell_restarted=restarted,
        )

    async def _exit_status(self) -> int | None:
        if self.process is None:
            return None
        with anyio.move_on_after(1.0):
            return await self.process.wait()
        return None

    def _kill_command(self, command_tag: str) -> None:
        """Interrupt the shell (abandons the command) and SIGKILL what this command started.

        Each command runs with `AGENTFLOW_COMMAND=<n>` exported, so its processes are told
        apart from background jobs of earlier commands, which live on.
        """
        if self.process is None:
            return
        target = self.shell_pid()
        if target is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGINT)
        needle = f"{COMMAND_ENV}={command_tag}".encode()
        kill_pids([pid for pid in descendants(self.process.pid) if needle in _environ(pid)])

    async def _collect(self, pending: _Pending, progress: ProgressFn | None, started: float) -> None:
        """Read the streams still short of their sentinel; stop early if the shell exits.

        stdout is read in this task and stderr in one helper task (both must drain, or a
        command filling one pipe would block). Shell exit and progress are checked on the
        stdout reader's idle wake-ups rather than by more tasks: this is the hot path.
        """
        if pending.finished or pending.exited or self.process is None:
            return
        assert self._scanners is not None
        process = self.process
        assert process.stdout is not None
        assert process.stderr is not None
        async with anyio.create_task_group() as tg:
            if pending.codes[1] is None:
                tg.start_soon(self._read_stderr, process.stderr, pending, tg.cancel_scope)
            if pending.codes[0] is None:
                await self._read_stdout(process, pending, progress, started)
            if pending.exited:
                tg.cancel_scope.cancel()

    async def _read_stderr(self, stream: ByteReceiveStream, pending: _Pending, group: anyio.CancelScope) -> None:
        assert self._scanners is not None
        code = await _read_to_sentinel(stream, self._scanners[1], pending.captures[1])
        if code is None:
            pending.exited = True
            group.cancel()
        pending.codes[1] = code

    async def _read_stdout(
        self, process: Process, pending: _Pending, progress: ProgressFn | None, started: float
    ) -> None:
        assert self._scanners is not None
        assert process.stdout is not None
        scanner, capture = self._scanners[0], pending.captures[0]
        code = scanner.feed(b"", capture)
        next_progress = started + self.progress_interval
        idle_check = min(IDLE_CHECK, self.progress_interval)
        while code is None:
            chunk = None
            with anyio.move_on_after(idle_check):
                try:
                    chunk = await process.stdout.receive(65536)
                except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                    scanner.drain(capture)
                    pending.exited = True
                    return
            if chunk is not None:
                code = scanner.feed(chunk, capture)
                continue
            if process.returncode is not None:  # exited, but a background job holds the pipe open
                pending.exited = True
                return
            now = time.monotonic()
            if progress is not None and now >= next_progress:
                next_progress = now + self.progress_interval
                await progress(now - started, None, f"command running for {now - started:.0f}s")
        pending.codes[0] = code


class _Pending:
    """Per-command progress across reads: captures, and each stream's exit code once seen."""

    def __init__(self, cap: int) -> None:
        self.captures = (BoundedCapture(cap), BoundedCapture(cap))
        self.codes: list[int | None] = [None, None]
        self.exited = False

    @property
    def finished(self) -> bool:
        return self.codes[0] is not None and self.codes[1] is not None


async def _read_to_sentinel(stream: ByteReceiveStream, scanner: SentinelScanner, capture: BoundedCapture) -> int | None:
    code = scanner.feed(b"", capture)
    while code is None:
        try:
            chunk = await stream.receive(65536)
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            scanner.drain(capture)
            return None
        code = scanner.feed(chunk, capture)
    return code


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []
