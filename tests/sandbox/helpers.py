"""Shared helpers for sandbox tests: a per-run server id, a box factory, running a script inside.

Every sandbox these tests make carries this run's server id (`sbxtest-<pid>-<hex>`), so leak
checks count only this run's cgroups and processes.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from backends.policy import Policy
from backends.sandbox import SandboxSpec, SessionSandbox, mechanisms
from session.errors import ConfigurationError
from tests.support.procs import pids_of_uid

RUN_SERVER_ID = f"sbxtest-{os.getpid()}-{secrets.token_hex(4)}"
#: gVisor sessions take ~0.5 s to start: slow, like the other real-component tests.
GVISOR = pytest.param("gvisor", marks=pytest.mark.slow)
TIERS = ("none", "sandbox", GVISOR)
SANDBOXED = ("sandbox", GVISOR)
BoxFactory = Callable[..., Awaitable[SessionSandbox]]


def require_tier(tier: str) -> None:
    """Skip (with the host's reason) when this machine cannot provide `tier`."""
    state = mechanisms()["tiers"][tier]
    if state != "available":
        pytest.skip(f"isolation {tier!r} {state}")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def read_proc(pid: int | str, name: str) -> str:
    """A /proc file as text ('' if the process is gone): sync on purpose, /proc never blocks."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as fh:
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def niceness(pid: int | str) -> int | None:
    """A thread's niceness from its stat line (field 19), None if it is gone."""
    stat = read_proc(pid, "stat")
    return int(stat.rsplit(")", 1)[1].split()[16]) if stat else None


def thread_niceness(pids: list[int]) -> dict[int, int]:
    """tid -> niceness for every thread of `pids` (those gone meanwhile left out)."""
    found: dict[int, int] = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            value = niceness(f"{pid}/task/{tid}")
            if value is not None:
                found[int(tid)] = value
    return found


def host_exists(path: str | Path) -> bool:
    """Whether `path` exists on the host (sync on purpose: a local stat in a test)."""
    return os.path.lexists(path)


def has_cap_sys_resource() -> bool:
    for line in read_proc("self", "status").splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << 24))
    return False


def run_cgroup_dirs() -> list[Path]:
    """This run's cgroup directories still on the host (should be none after cleanup).

    `os.walk` rather than `rglob`: other servers on the machine make and remove session
    cgroups all the time, and rglob fails on a directory that vanishes under it.
    """
    found = []
    for ctrl in Path("/sys/fs/cgroup").iterdir():
        for root, _, _ in os.walk(ctrl):
            if Path(root).name == RUN_SERVER_ID and Path(root).parent.name == "agentflow":
                found.append(Path(root))
    return found


async def box_factory(tmp_path: Path) -> AsyncIterator[BoxFactory]:
    """Yield `make(tier, label=..., network=..., **limits)`; every box is closed and checked at the end."""
    boxes: list[SessionSandbox] = []
    counter = iter(range(1, 1000))

    async def make(
        tier: str = "sandbox", *, network: str = "none", binds: tuple = (), nice: int = 0, **limits: Any
    ) -> SessionSandbox:
        require_tier(tier)
        label = f"s{next(counter)}"
        home = tmp_path / label / "home"
        home.mkdir(parents=True)
        policy = Policy(isolation=tier, network=network, limits=limits)
        box = await SessionSandbox.create(
            SandboxSpec(label=label, policy=policy, server_id=RUN_SERVER_ID, home=home, binds=binds, nice=nice)
        )
        boxes.append(box)
        return box

    yield make
    uids = {box.uid for box in boxes if box.tier != "none"}
    for box in boxes:
        await box.aclose()
    # A killed process leaves the cgroup a moment before it leaves /proc: poll, with a deadline.
    with anyio.move_on_after(10):
        while any(pids_of_uid(uid) for uid in uids) or any(b.pids() for b in boxes):  # noqa: ASYNC110
            await anyio.sleep(0.01)
    for uid in uids:
        assert not pids_of_uid(uid), f"processes of session uid {uid} survived aclose"
    assert not [str(b) for b in boxes if b.pids()]


async def run(
    box: SessionSandbox,
    script: str,
    *,
    env: dict[str, str] | None = None,
    within: float = 60,
    **kwargs: Any,
) -> tuple[int, str]:
    """Run `bash -c script` in the box; (exit status, stdout+stderr)."""
    full_env = {"PATH": "/usr/bin:/bin", "HOME": box.home_path, "LANG": "C.UTF-8", **(env or {})}
    process = await box.spawn(
        ["/bin/bash", "-c", script], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs
    )
    out = bytearray()
    with anyio.fail_after(within):
        assert process.stdout is not None
        async for chunk in process.stdout:
            out += chunk
        status = await process.wait()
    await process.aclose()
    return status, out.decode(errors="replace")


__all__ = ["GVISOR", "RUN_SERVER_ID", "SANDBOXED", "TIERS", "BoxFactory", "ConfigurationError", "box_factory", "run"]
