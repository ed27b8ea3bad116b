"""Shared helpers for sandbox tests: a per-run server id, a box factory, running a script inside.

Every sandbox these tests make carries this run's server id (`sbxtest-<pid>-<hex>`), so leak
checks count only this run's cgroups and processes.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process

from backends.policy import Policy
from backends.sandbox import SandboxSpec, SessionSandbox, launcher, mechanisms
from session.errors import ConfigurationError
from tests.support.procs import pids_of_uid

RUN_SERVER_ID = f"sbxtest-{os.getpid()}-{secrets.token_hex(4)}"
#: gVisor sessions take ~0.5 s to start: slow, like the other real-component tests.
GVISOR = pytest.param("gvisor", marks=pytest.mark.slow)
TIERS = ("none", "sandbox", GVISOR)
SANDBOXED = ("sandbox", GVISOR)
BoxFactory = Callable[..., Awaitable[SessionSandbox]]


#: How a spawn starts on the host: the launcher, or the chain used where it cannot be built.
CHAINS = ("launcher", "fallback")


def use_chain(chain: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make sandboxes created from now on start their spawns through `chain` (skip if unavailable)."""
    if chain == "fallback":
        monkeypatch.setattr(launcher, "path", lambda: None)
    elif launcher.path() is None:
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail("the launcher failed to build or run with the compiler at hand (see the warning logged)")
        pytest.skip("the launcher cannot be built here (no C compiler): only the fallback chain runs")


CAP_NET_BIND_SERVICE = 10
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, PR_CAP_AMBIENT_CLEAR_ALL = 47, 2, 4
_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@contextmanager
def inheritable_capability() -> Iterator[None]:
    """This thread (the one that spawns) holds a capability in its inheritable and ambient sets.

    Root's inheritable set is usually empty, so a start that forgot to clear it would still
    look clean; with one set, only a real drop passes. A no-op unless root.
    """
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    saved = (_CapData * 2)()
    if os.geteuid() != 0 or _libc.capget(ctypes.byref(header), saved) != 0:
        yield
        return
    raised = (_CapData * 2)()
    ctypes.memmove(raised, saved, ctypes.sizeof(saved))
    raised[0].inheritable |= 1 << CAP_NET_BIND_SERVICE
    assert _libc.capset(ctypes.byref(header), raised) == 0, os.strerror(ctypes.get_errno())
    assert _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_BIND_SERVICE, 0, 0) == 0
    try:
        yield
    finally:
        _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        _libc.capset(ctypes.byref(header), saved)


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


__all__ = [
    "CHAINS",
    "GVISOR",
    "RUN_SERVER_ID",
    "SANDBOXED",
    "TIERS",
    "BoxFactory",
    "ConfigurationError",
    "box_factory",
    "run",
]


async def start_ready(box: SessionSandbox, script: str) -> Process:
    """Spawn `bash -c script` in the box and wait until it prints 'ready'."""
    process = await box.spawn(["/bin/bash", "-c", script], env={"PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE)
    assert process.stdout is not None
    with anyio.fail_after(30):
        assert b"ready" in await process.stdout.receive()
    return process

