"""Process ownership: groups, the session marker sweep, and orphans of a dead server."""

from __future__ import annotations

import os
import subprocess
import uuid

import anyio

from backends.processes import (
    SERVER_ENV_MARKER,
    SESSION_ENV_MARKER,
    ProcessGroupOwner,
    pids_with_marker,
    sweep_orphans,
)
from tests.support.polling import eventually
from tests.support.procs import alive


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


async def test_aclose_kills_the_group_and_processes_that_left_it():
    tag = f"test-owner-{uuid.uuid4().hex[:12]}"  # unique: aclose sweeps every process carrying it
    owner = ProcessGroupOwner(tag, grace=0.5)
    shell = await owner.spawn(["bash", "-c", "setsid sleep 300 & sleep 301 & wait"])

    def escaped() -> list[int]:  # the setsid'd sleep, once it is in a group of its own
        return [p for p in pids_with_marker(tag) if _pgid(p) not in (shell.pid, None)]

    await eventually(lambda: len(pids_with_marker(tag)) >= 3 and escaped(), 10)
    left_the_group = escaped()
    await owner.aclose()
    assert pids_with_marker(tag) == []
    assert not any(alive(p) for p in left_the_group)


async def test_a_dead_servers_processes_are_swept_and_a_live_servers_are_not():
    # Every process is closed with `async with` (pipes closed, reaped) while this test's event
    # loop runs: a transport collected after its loop closed fails a later test.
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    # A server pid that cannot exist (above pid_max): a reaped pid could be reused meanwhile.
    dead_pid = int(await anyio.Path("/proc/sys/kernel/pid_max").read_text()) + 1
    marker = uuid.uuid4().hex[:12]
    env = {**os.environ, SESSION_ENV_MARKER: f"test-orphan-{marker}", SERVER_ENV_MARKER: str(dead_pid)}
    env_live = {**os.environ, SESSION_ENV_MARKER: f"test-kept-{marker}", SERVER_ENV_MARKER: str(os.getpid())}
    async with (
        await anyio.open_process(["sleep", "300"], env=env, start_new_session=True, **quiet) as orphan,
        await anyio.open_process(["sleep", "300"], env=env_live, start_new_session=True, **quiet) as kept,
    ):
        try:
            swept = sweep_orphans()
            assert orphan.pid in swept
            assert kept.pid not in swept
            with anyio.fail_after(15):
                await orphan.wait()
            assert kept.returncode is None
        finally:
            for process in (orphan, kept):
                if process.returncode is None:
                    process.kill()
                    await process.wait()
