"""Process ownership: groups, the session marker sweep, and orphans of a dead server."""

from __future__ import annotations

import os

import anyio

from backends.processes import (
    SERVER_ENV_MARKER,
    SESSION_ENV_MARKER,
    ProcessGroupOwner,
    pids_with_marker,
    sweep_orphans,
)
from tests.support.polling import eventually


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


async def test_aclose_kills_the_group_and_processes_that_left_it():
    owner = ProcessGroupOwner("test-owner-1", grace=0.5)
    shell = await owner.spawn(["bash", "-c", "setsid sleep 300 & sleep 301 & wait"])

    def escaped() -> list[int]:  # the setsid'd sleep, once it is in a group of its own
        return [p for p in pids_with_marker("test-owner-1") if _pgid(p) not in (shell.pid, None)]

    await eventually(lambda: len(pids_with_marker("test-owner-1")) >= 3 and escaped(), 10)
    left_the_group = escaped()
    await owner.aclose()
    assert pids_with_marker("test-owner-1") == []
    assert not any(_alive(p) for p in left_the_group)


async def test_a_dead_servers_processes_are_swept_and_a_live_servers_are_not():
    dead = await anyio.open_process(["true"])
    await dead.wait()
    env = {**os.environ, SESSION_ENV_MARKER: "test-orphan", SERVER_ENV_MARKER: str(dead.pid)}
    orphan = await anyio.open_process(["sleep", "300"], env=env, start_new_session=True)
    env_live = {**os.environ, SESSION_ENV_MARKER: "test-kept", SERVER_ENV_MARKER: str(os.getpid())}
    kept = await anyio.open_process(["sleep", "300"], env=env_live, start_new_session=True)
    try:
        swept = sweep_orphans()
        assert orphan.pid in swept
        assert kept.pid not in swept
        with anyio.fail_after(5):
            await orphan.wait()
        assert kept.returncode is None
    finally:
        kept.kill()
        await kept.wait()
