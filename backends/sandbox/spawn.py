"""Starting a session's host-side process chain cheaply, whatever event loop the server runs.

`anyio.open_process` hands the spawn to the event loop. Python 3.11's asyncio spawns through
`subprocess.Popen` (vfork), but uvloop, which the HTTP server runs on, spawns through libuv's
`fork()`: the whole server's page tables are copied on every session start, with the loop
blocked meanwhile (measured here: 2.3 ms of CPU and ~10 ms wall per spawn of a 150 MB
process, against 0.65 ms and ~3 ms with vfork). So sessions spawn through `subprocess.Popen`
on every loop, and this module gives the child the `anyio.abc.Process` face the backends use:
non-blocking pipe streams waited on with `anyio.wait_readable`/`wait_writable`, and exit
learned from a pidfd (no thread, no SIGCHLD handler, no child watcher).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import IO, Any

import anyio
from anyio.abc import ByteReceiveStream, ByteSendStream, Process

_Stream = int | IO[Any] | None


class _FdReceiveStream(ByteReceiveStream):
    """The read end of a pipe, non-blocking."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while True:
            if self._fd < 0:
                raise anyio.ClosedResourceError
            try:
                data = os.read(self._fd, max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._fd)
                continue
            if not data:
                raise anyio.EndOfStream
            return data

    async def aclose(self) -> None:
        _close(self)


class _FdSendStream(ByteSendStream):
    """The write end of a pipe, non-blocking."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        while view:
            if self._fd < 0:
                raise anyio.ClosedResourceError
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                await anyio.wait_writable(self._fd)
                continue
            except (BrokenPipeError, ConnectionResetError):
                raise anyio.BrokenResourceError from None
            view = view[written:]

    async def aclose(self) -> None:
        _close(self)


def _close(stream: _FdReceiveStream | _FdSendStream) -> None:
    fd, stream._fd = stream._fd, -1
    if fd >= 0:
        anyio.notify_closing(fd)  # a task waiting on it gets ClosedResourceError, not a hang
        os.close(fd)


class SpawnedProcess(Process):
    """A child started by `spawn`: pipes as anyio streams, exit through a pidfd."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        stdin: _FdSendStream | None,
        stdout: _FdReceiveStream | None,
        stderr: _FdReceiveStream | None,
    ) -> None:
        self._popen = popen
        self._pidfd = os.pidfd_open(popen.pid)
        self._returncode: int | None = None
        self._waiting = anyio.Lock()
        self._stdin = stdin
        self._stdout = stdout
        self._stderr = stderr

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        if self._returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: as asyncio reports it
                self._exited(255)
            else:
                if pid:
                    self._exited(os.waitstatus_to_exitcode(status))
        return self._returncode

    def _exited(self, code: int) -> None:
        self._returncode = code
        self._popen.returncode = code  # Popen.__del__ then knows it was reaped

    async def wait(self) -> int:
        while self.returncode is None:
            async with self._waiting:  # one waiter on the pidfd at a time
                if self.returncode is None and self._pidfd >= 0:
                    await anyio.wait_readable(self._pidfd)
        if self._pidfd >= 0 and not self._waiting.locked():
            os.close(self._pidfd)
            self._pidfd = -1
        assert self._returncode is not None
        return self._returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True) as scope:
            for stream in (self._stdin, self._stdout, self._stderr):
                if stream is not None:
                    await stream.aclose()
            try:
                await self.wait()
            except BaseException:
                scope.cancel()
                self.kill()
                raise

    @property
    def stdin(self) -> ByteSendStream | None:
        return self._stdin

    @property
    def stdout(self) -> ByteReceiveStream | None:
        return self._stdout

    @property
    def stderr(self) -> ByteReceiveStream | None:
        return self._stderr


def _pipe_if_asked(spec: _Stream, *, child_reads: bool, opened: list[int]) -> tuple[_Stream, int | None]:
    """(what the child gets, the parent's end) for one standard stream."""
    if spec != subprocess.PIPE:
        return spec, None
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    opened += [read_end, write_end]
    return (read_end, write_end) if child_reads else (write_end, read_end)


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str,
    stdin: _Stream,
    stdout: _Stream,
    stderr: _Stream,
    pass_fds: Sequence[int],
) -> SpawnedProcess:
    """Start `argv` in a new session (vfork + exec via Popen). Raises OSError as Popen does."""
    opened: list[int] = []
    try:
        child_in, parent_in = _pipe_if_asked(stdin, child_reads=True, opened=opened)
        child_out, parent_out = _pipe_if_asked(stdout, child_reads=False, opened=opened)
        child_err, parent_err = _pipe_if_asked(stderr, child_reads=False, opened=opened)
        popen = subprocess.Popen(
            list(argv),
            stdin=child_in,
            stdout=child_out,
            stderr=child_err,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
        )
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    parents = {parent_in, parent_out, parent_err}
    for fd in opened:
        if fd not in parents:
            os.close(fd)  # the child's ends: it has its own copies now
    return SpawnedProcess(
        popen,
        _FdSendStream(parent_in) if parent_in is not None else None,
        _FdReceiveStream(parent_out) if parent_out is not None else None,
        _FdReceiveStream(parent_err) if parent_err is not None else None,
    )
