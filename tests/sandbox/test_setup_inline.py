"""A warm server sets a sandboxed session up and releases it on the event loop, not in a worker thread.

Why it matters: setup and release are ~1 ms of short system calls, and each of them in a worker
thread hands the GIL back and forth with the busy event loop. Measured over HTTP (back-to-back
temporary calls): ~50 more context switches per session and ~1.2 ms more server CPU per call
than the work itself. What may take long (the launcher's first build, copying a seeded home,
gVisor's state tree) still goes to a thread, so the loop is never held for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from backends.policy import Policy
from backends.sandbox import SandboxSpec, SessionSandbox, launcher, uids
from tests.sandbox.helpers import RUN_SERVER_ID, require_tier, run


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the functions sent to a worker thread from now on."""
    sent: list[str] = []
    real = anyio.to_thread.run_sync

    async def counting(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        sent.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    return sent


async def started(home: Path, label: str, tier: str = "sandbox") -> SessionSandbox:
    policy = Policy(isolation=tier)
    return await SessionSandbox.create(SandboxSpec(label=label, policy=policy, server_id=RUN_SERVER_ID, home=home))


async def warm_up(tmp_path: Path, tier: str = "sandbox") -> None:
    """One session first: the tier check and the launcher's adoption happen once per server."""
    assert launcher.path() is not None, "the launcher must build here (see tests/sandbox/test_launcher.py)"
    box = await started(tmp_path / "warm", "warm", tier)
    await box.aclose()


async def test_an_empty_home_is_set_up_and_released_without_a_thread(tmp_path: Path, hops: list[str]) -> None:
    require_tier("sandbox")
    await warm_up(tmp_path)
    hops.clear()
    box = await started(tmp_path / "home", "inline")
    try:
        status, out = await run(box, "echo ok > ~/f; cat ~/f")
        assert (status, out.strip()) == (0, "ok")
    finally:
        await box.aclose()
    assert hops == []
    assert not (tmp_path / "home").is_symlink()


async def test_a_home_to_seed_is_copied_in_a_thread(tmp_path: Path, hops: list[str]) -> None:
    require_tier("sandbox")
    await warm_up(tmp_path)
    home = tmp_path / "seeded"
    home.mkdir()
    (home / "given.txt").write_text("from the caller\n")
    hops.clear()
    box = await started(home, "seeded")
    try:
        assert (await run(box, "cat ~/given.txt"))[1] == "from the caller\n"
    finally:
        await box.aclose()
    assert hops == ["_setup"]


async def test_gvisor_sessions_set_up_and_release_in_a_thread(tmp_path: Path, hops: list[str]) -> None:
    require_tier("gvisor")
    await warm_up(tmp_path, "gvisor")
    hops.clear()
    box = await started(tmp_path / "home", "gv", "gvisor")
    await box.aclose()
    assert hops[0] == "_setup"
    assert hops[-1] == "_release"


async def test_a_launcher_not_yet_checked_sends_the_setup_to_a_thread(
    tmp_path: Path, hops: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    require_tier("sandbox")
    await warm_up(tmp_path)
    monkeypatch.setattr(launcher, "settled", lambda: False)  # as before the first build, or at the hourly check
    hops.clear()
    box = await started(tmp_path / "home", "unsettled")
    await box.aclose()
    assert hops == ["_setup"]


async def test_a_uid_lease_that_needs_a_new_batch_sends_the_setup_to_a_thread(
    tmp_path: Path, hops: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    require_tier("sandbox")
    if os.geteuid() != 0:
        pytest.skip("sessions get their own uid only from a root server")
    await warm_up(tmp_path)
    monkeypatch.setattr(uids, "spare_ready", lambda: False)  # the next lease locks a batch: a /proc scan
    hops.clear()
    box = await started(tmp_path / "home", "no-spare")
    await box.aclose()
    assert hops == ["_setup"]


async def test_a_session_that_filled_its_tmpfs_is_released_in_a_thread(tmp_path: Path, hops: list[str]) -> None:
    # The kernel frees a tmpfs page by page when the session's namespace closes (800 MB: ~46 ms
    # here): never on the event loop.
    require_tier("sandbox")
    await warm_up(tmp_path)
    box = await started(tmp_path / "home", "full")
    try:
        status, out = await run(box, "head -c 16M /dev/zero > ~/big && echo ok")
        assert (status, out.strip()) == (0, "ok")
    finally:
        hops.clear()
        await box.aclose()
    assert hops == ["_release"]
