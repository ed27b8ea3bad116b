"""One persistent bash process driven over pipes, inside the session's sandbox.

Each command is sent as a quoted here-document that the shell `source`s: bash reads it
whole (through a pipe, no temp file) before running it, so quotes can't desync the
protocol, a command reading stdin gets EOF instead of eating the protocol, and `cd`,
variables (even `declare`d ones) and functions persist. After it, a read-only function
defined when the shell starts re-arms the interrupt trap, exports the next command's
number and prints a per-shell sentinel with the exit code on stderr and then on stdout;
the reader stops at the sentinel.

Why so terse: bash reads a pipe one byte per `read` call (it must not consume input meant
for the commands it runs), so every byte sent costs a system call, and under gVisor's
ptrace platform a system call costs tens of microseconds (in the default sandbox, ~0.3 us
of bash's time per byte). The line per command is about 75 bytes beyond the command itself.
The sentinel is one line: bash's stdout is line buffered, so a newline inside it would be a
second write and a second wake-up here.

Reading: a command that answers at once (most do) is read in the calling task, stdout to
its sentinel and then stderr, with no helper task; one still running after a few
milliseconds, or filling stderr while stdout waits, continues with both streams drained
concurrently.

Interrupting: the shell runs with `trap 'return 130' INT`, re-armed after every command.
On timeout or cancellation the command's processes get SIGKILL and the shell SIGINT
(`backends.bash.interrupt`); `return` inside a sourced file abandons the rest of the
command (even a busy builtin loop), and the sentinel follows. Only if the shell fails to
answer is it killed and restarted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import anyio
from anyio.abc import ByteReceiveStream, Process

from backends.base import ProgressFn
from backends.bash.capture import BoundedCapture, SentinelScanner
from backends.bash.interrupt import COMMAND_ENV, Interrupter
from backends.sandbox import SessionSandbox
from session.errors import BackendError, ParameterError

log = logging.getLogger(__name__)

#: How long a timed-out command's shell gets to print its sentinel after its children die.
RECOVERY_GRACE = 3.0
#: How often a silent command is checked for shell exit (and progress is due).
IDLE_CHECK = 0.5
#: How long a command is read in the calling task alone before both streams get a reader each.
QUICK_WAIT = 0.02
#: How bash names the sourced command in its error messages (noise in ours).
_SOURCE_PREFIX = re.compile(r"^/dev/stdin: line \d+: ", re.MULTILINE)
#: How long the shell may take to start and enter its configured directory.
STARTUP_TIMEOUT = 30.0


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
    """A bash process kept alive across commands, inside `sandbox`; restartable if it dies."""

    def __init__(
        self,
        sandbox: SessionSandbox,
        *,
        argv: list[str],
        env: Mapping[str, str],
        cwd: str | None,
        max_output_bytes: int,
        progress_interval: float = 5.0,
    ) -> None:
        self.sandbox = sandbox
        self.progress_interval = progress_interval
        # Random per shell (a command containing the delimiter is refused, the function is
        # read-only); short because every byte sent is a read() by bash.
        self.heredoc_end = f"_AF{uuid.uuid4().hex[:12]}"
        self._done = f"_af{uuid.uuid4().hex[:8]}"
        self.argv = argv
        self.env = dict(env)
        self.cwd = cwd
        self.max_output_bytes = max_output_bytes
        self.marker = f"__AF_{uuid.uuid4().hex}_"
        self.process: Process | None = None
        self._interrupter: Interrupter | None = None
        self._scanners: tuple[SentinelScanner, SentinelScanner] | None = None
        self.restarts = 0
        self.commands_run = 0

    # -- lifetime --------------------------------------------------------------------

    async def start(self, *, check_cwd: bool = True) -> None:
        """Start the shell in the sandbox and enter `cwd` (a path inside the sandbox).

        Raises:
            ParameterError: `cwd` is not a directory inside the sandbox (checked on first start only).
        """
        self.process = await self.sandbox.spawn(
            self.argv,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._scanners = (SentinelScanner(self.marker), SentinelScanner(self.marker))
        self._interrupter = Interrupter(self.sandbox, self.process)
        assert self.process.stdin is not None
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            # A shell that died at once shows it on the first round trip below.
            await self.process.stdin.send(self._prologue().encode())
        # One round trip before the session is handed out: the shell really runs (inside its
        # cgroup, past the sandbox's setup) and stands in its directory.
        startup = f"cd -- {shlex.quote(self.cwd)}" if self.cwd is not None else ":"
        entered = await self._execute(startup, STARTUP_TIMEOUT, None)
        if not (entered.shell_exited or entered.timed_out):
            # Best effort: keeps the OOM killer on the wrappers' side of the session (see
            # protect). After the round trip, so the wrappers are there to find at once
            # (before it, finding them meant polling /proc while bwrap set up).
            await self.sandbox.protect(self.process, started=True)
        if entered.shell_exited or entered.timed_out:
            await self.kill()
            detail = (entered.stderr.strip() or entered.stdout.strip() or "no output")[:300]
            raise BackendError(f"the shell {shlex.join(self.argv)[:120]!r} did not start inside the sandbox: {detail}")
        if entered.exit_code != 0 and check_cwd:
            await self.kill()
            assert self.cwd is not None
            raise ParameterError(
                f"cwd {self.cwd[:200]!r} is not a directory inside the session's sandbox "
                f"({_SOURCE_PREFIX.sub('', entered.stderr.strip()) or 'cd failed'}"[:260]
                + "); the session sees its home and the host's "
                "read-only system directories, not the server's files"
            )

    def _prologue(self) -> str:
        """Defines the after-command function (read-only: a command cannot replace it) and arms
        the first command: `<done> <exit code> <next command number>`.

        stderr's sentinel goes first: by the time the reader has stdout's, stderr's is already
        in, so a finished command is collected in one wake-up."""
        sentinel = f"builtin printf '{self.marker}%d__\\n' \"$1\""
        rearm = f"builtin trap 'return 130' INT; builtin export {COMMAND_ENV}"
        return (
            f"{self._done}() {{ {rearm}=$2; {sentinel} >&2; {sentinel}; }}; builtin readonly -f {self._done}; "
            f"{rearm}={self.commands_run + 1}\n"
        )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def shell_pid(self) -> int | None:
        """Host pid of the bash process itself (under the sandbox's wrappers); for gVisor, runsc's."""
        if self.process is None or self._interrupter is None:
            return None
        return self._interrupter.shell_pid()

    def signal_kill(self) -> None:
        """SIGKILL the shell's process group now, without waiting; `kill` reaps it later."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
                os.killpg(self.process.pid, signal.SIGKILL)

    async def kill(self) -> None:
        """Kill the shell (the sandbox's `aclose` kills whatever else the session started)."""
        process, self.process = self.process, None
        self._interrupter = None
        if process is None:
            return
        # The group (the spawned process leads it): in tier `none` the shell's own jobs; otherwise
        # the wrappers, whose end tears the shell's namespace (and everything in it) down. Not
        # `process.kill()` as well: Popen polls before signalling and would reap the child under
        # asyncio's watcher, which then reports it as unknown.
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
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
            await self.start(check_cwd=False)
            self.restarts += 1
            restarted = True
        result = await self._execute(command, time_limit, progress)
        result.shell_restarted = restarted
        return result

    async def _execute(self, command: str, time_limit: float, progress: ProgressFn | None) -> CommandResult:
        assert self.process is not None
        assert self.process.stdin is not None
        pending = _Pending(self.max_output_bytes)
        started = time.monotonic()
        self.commands_run += 1
        command_tag = f"{self.commands_run}"
        line = (
            f"builtin . /dev/stdin <<'{self.heredoc_end}'\n{command}\n{self.heredoc_end}\n"
            f"{self._done} $? {self.commands_run + 1}\n"
        )
        timed_out = False
        try:
            try:
                await self.process.stdin.send(line.encode("utf-8", "surrogateescape"))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                # The shell is gone (or never started): what it printed says why.
                pending.exited = True
                await self._read_leftovers(pending)
            deadline = anyio.current_time() + time_limit
            with anyio.CancelScope(deadline=min(deadline, anyio.current_time() + QUICK_WAIT)):
                await self._collect_quickly(pending)
            if not pending.finished and not pending.exited:
                with anyio.CancelScope(deadline=deadline):
                    await self._collect(pending, progress, started)
            if not pending.finished and not pending.exited:
                timed_out = True
                await self._kill_command(command_tag)
                with anyio.move_on_after(RECOVERY_GRACE):
                    await self._collect(pending, None, started)
        except BaseException:
            # Cancelled (client gave up, session destroyed) or the pipe broke: stop the
            # command, and drop the shell unless it answers promptly.
            with anyio.CancelScope(shield=True):
                await self._kill_command(command_tag)
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
        )

    async def _read_leftovers(self, pending: _Pending) -> None:
        """Whatever an exited shell (or its sandbox) wrote before it went (bounded wait)."""
        assert self.process is not None
        assert self._scanners is not None
        for stream, scanner, capture in zip(
            (self.process.stdout, self.process.stderr), self._scanners, pending.captures, strict=True
        ):
            if stream is None:
                continue
            with anyio.move_on_after(1.0):
                await _read_to_sentinel(stream, scanner, capture)

    async def _exit_status(self) -> int | None:
        if self.process is None:
            return None
        with anyio.move_on_after(1.0):
            return await self.process.wait()
        return None

    async def _kill_command(self, command_tag: str) -> None:
        """SIGKILL what this command started and interrupt the shell (abandons the command).

        Each command runs with `AGENTFLOW_COMMAND=<n>` exported, so its processes are told
        apart from background jobs of earlier commands, which live on.
        """
        if self._interrupter is not None:
            await self._interrupter.interrupt(command_tag)

    async def _collect_quickly(self, pending: _Pending) -> None:
        """Read stdout to its sentinel, then stderr, in this task; the caller bounds it by `QUICK_WAIT`.

        The shell prints the stderr sentinel just before the stdout one, so for a command that
        is done this costs no helper task and no second wait. Bounded because it drains one stream at a time: a
        command writing much to stderr before stdout's sentinel blocks once the stderr pipe is
        full, until `_collect` drains both. If stdout ends (the shell exited), stderr is still
        read, for what the shell said last.
        """
        if pending.exited or self.process is None:
            return
        assert self._scanners is not None
        process = self.process
        for index, stream in enumerate((process.stdout, process.stderr)):
            assert stream is not None
            if pending.codes[index] is None:
                code = await _read_to_sentinel(stream, self._scanners[index], pending.captures[index])
                pending.codes[index] = code
                if code is None:
                    pending.exited = True

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
