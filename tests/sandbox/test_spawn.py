"""The sandbox's own spawn: Popen (vfork) with non-blocking pipe streams and exit from a pidfd,
on asyncio and on uvloop (the HTTP server's loop)."""

from __future__ import annotations

import os
import signal
import subprocess

import anyio
import pytest

from backends.sandbox.spawn import SpawnedProcess, spawn

ENV = {"PATH": "/usr/bin:/bin"}


def cat() -> SpawnedProcess:
    return spawn(["cat"], env=ENV, cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, pass_fds=())


async def round_trips_then_eof() -> int:
    process = cat()
    assert process.stdin is not None
    assert process.stdout is not None
    for line in (b"one\n", b"two\n" * 5000):  # the second fills the pipe: send waits for the reader
        async with anyio.create_task_group() as tg:
            tg.start_soon(process.stdin.send, line)
            got = b""
            while len(got) < len(line):
                got += await process.stdout.receive()
        assert got == line
    await process.stdin.aclose()
    with pytest.raises(anyio.EndOfStream):
        await process.stdout.receive()
    code = await process.wait()
    assert process.returncode == code
    await process.aclose()
    return code


async def killed_process_reports_its_signal() -> None:
    process = cat()
    assert process.returncode is None
    process.kill()
    async with anyio.create_task_group() as tg:  # two waiters: both learn the exit
        tg.start_soon(process.wait)
        tg.start_soon(process.wait)
    assert process.returncode == -signal.SIGKILL
    assert process.stdin is not None
    with pytest.raises(anyio.BrokenResourceError):
        await process.stdin.send(b"x\n" * 100_000)
    await process.aclose()
    assert process.stdout is not None
    with pytest.raises(anyio.ClosedResourceError):
        await process.stdout.receive()


async def a_reader_blocked_on_a_closed_stream_is_woken() -> None:
    process = cat()
    assert process.stdout is not None
    stdout = process.stdout
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def read() -> None:
                with pytest.raises(anyio.ClosedResourceError):
                    await stdout.receive()

            tg.start_soon(read)
            await anyio.wait_all_tasks_blocked()
            await stdout.aclose()
    process.kill()
    await process.aclose()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_pipes_exit_and_closing_behave_like_anyio_processes(loop: str) -> None:
    options = {"use_uvloop": loop == "uvloop"}
    assert anyio.run(round_trips_then_eof, backend="asyncio", backend_options=options) == 0
    anyio.run(killed_process_reports_its_signal, backend="asyncio", backend_options=options)
    anyio.run(a_reader_blocked_on_a_closed_stream_is_woken, backend="asyncio", backend_options=options)


def test_a_missing_program_raises_and_leaks_no_descriptor() -> None:
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        spawn(["/nonexistent/program"], env=ENV, cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
              stderr=subprocess.PIPE, pass_fds=())
    assert len(os.listdir("/proc/self/fd")) == before
