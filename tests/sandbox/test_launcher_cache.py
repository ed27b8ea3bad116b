"""The launcher's and the gVisor shim's build caches while a server runs: recovery, distrust, pruning.

Every test points the cache at its own directory and uses a fresh server-side launcher, so the
machine's shared cache (/run/agentflow/...) and other servers using it are never touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import pytest

from backends.sandbox import buildcache, gvisor, launcher
from tests.sandbox.helpers import BoxFactory, run

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler: nothing is built"
)
DAY = 86400.0
#: Sessions are real, so both tiers a launcher serves are exercised (gVisor is slow and adds nothing here).
LAUNCHED_TIERS = ("none", "sandbox")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh server launcher whose cache root is this test's own; returns the root."""
    root = tmp_path / "launch"
    monkeypatch.setattr(launcher, "cache_root", lambda: root)
    monkeypatch.setattr(launcher, "_server", launcher.ServerLauncher())
    return root


def current_binary() -> Path:
    found = launcher.path()
    assert found is not None, "the launcher failed to build with the compiler at hand"
    return Path(found)


def no_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "no-compiler"
    empty.mkdir()
    monkeypatch.setattr(launcher, "_BUILD_ENV", {"PATH": str(empty)})


def age(path: Path, seconds: float, *, atime_too: bool = True) -> None:
    """Set `path`'s mtime (and atime) `seconds` back, without following a symlink."""
    then = time.time() - seconds
    info = path.lstat()
    os.utime(path, (then if atime_too else info.st_atime, then), follow_symlinks=False)


def build_dir(root: Path, name: str, *, days_old: float, file: str = "agentflow-launch") -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / file).write_bytes(b"an old build")
    age(directory / file, days_old * DAY)
    age(directory, days_old * DAY)
    return directory


# -- recovery ---------------------------------------------------------------------------


@pytest.mark.parametrize("tier", LAUNCHED_TIERS)
async def test_a_launcher_deleted_while_the_server_runs_is_rebuilt_for_the_next_session(
    cache: Path, make_box: BoxFactory, tier: str
) -> None:
    first = await make_box(tier)
    assert await run(first, "echo one") == (0, "one\n")
    binary = current_binary()
    assert binary.parent.parent == cache
    original = binary.read_bytes()

    binary.unlink()
    second = await make_box(tier)  # its setup notices and rebuilds
    assert await run(second, "echo two") == (0, "two\n")
    assert binary.read_bytes() == original
    # The rebuild is at the same path, so the older session's spawns work again too.
    assert await run(first, "echo three") == (0, "three\n")


@pytest.mark.parametrize("how", ["renamed over it", "rewritten in place, size and mtime kept"])
async def test_a_replaced_launcher_is_rebuilt_and_never_run(
    cache: Path, make_box: BoxFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    await make_box("sandbox")
    binary = current_binary()
    original = binary.read_bytes()
    marker = tmp_path / "the-replacement-ran"
    script = f'#!/bin/sh\ntouch {marker}\nexec "$@"\n'.encode()
    if how == "renamed over it":
        fake = binary.with_name("replacement")
        fake.write_bytes(script)
        fake.chmod(0o755)
        fake.replace(binary)
    else:
        before = binary.stat()
        binary.write_bytes(script.ljust(before.st_size, b"\n"))
        os.utime(binary, ns=(before.st_atime_ns, before.st_mtime_ns))  # only ctime still tells
        assert binary.stat().st_size == before.st_size

    with caplog.at_level(logging.WARNING):
        second = await make_box("sandbox")
        assert await run(second, "echo fine") == (0, "fine\n")
    assert not marker.exists()
    assert binary.read_bytes() == original
    assert "is not the build this server verified: replacing it without running it" in caplog.text
    assert [p.name for p in binary.parent.iterdir()] == [launcher.NAME]  # no partial file left


def test_another_servers_identical_rebuild_is_adopted_without_compiling(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    binary = current_binary()
    copy = binary.with_name("from-another-server")
    shutil.copy2(binary, copy)
    copied = copy.stat().st_ino
    copy.replace(binary)
    no_compiler(tmp_path, monkeypatch)  # a rebuild would now fail: adopting must not need one
    with caplog.at_level(logging.WARNING):
        assert current_binary() == binary
    assert binary.stat().st_ino == copied  # adopted as it is, not rebuilt
    assert caplog.records == []


async def test_when_the_rebuild_fails_sessions_fall_back_with_one_warning(
    cache: Path, make_box: BoxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    await make_box("sandbox")
    current_binary().unlink()
    no_compiler(tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING):
        second = await make_box("sandbox")
        third = await make_box("sandbox")
        assert await run(second, "echo two") == (0, "two\n")
        assert await run(third, "echo three") == (0, "three\n")
    assert launcher.path() is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "the session launcher is unavailable (no C compiler" in warnings[0]


def test_a_change_in_a_cache_others_can_now_write_falls_back_instead(
    cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    binary = current_binary()
    cache.chmod(0o777)  # someone opened the cache to others; the verified build itself is unchanged...
    assert current_binary() == binary
    marker = tmp_path / "ran"
    fake = binary.with_name("replacement")
    fake.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake.chmod(0o755)
    fake.replace(binary)  # ...until it changes: the re-verification checks the directories again
    with caplog.at_level(logging.WARNING):
        assert launcher.path() is None
    assert not marker.exists()
    assert "writable by it alone" in caplog.text


def test_an_untrusted_file_in_place_of_a_first_build_is_replaced_not_run(cache: Path, tmp_path: Path) -> None:
    directory = cache / launcher.cache_key()
    directory.mkdir(parents=True)
    marker = tmp_path / "ran"
    planted = directory / launcher.NAME
    planted.write_text(f"#!/bin/sh\ntouch {marker}\n")
    planted.chmod(0o777)  # writable by anyone: whoever wrote it is not vouched for
    binary = current_binary()
    assert binary == planted
    assert not marker.exists()
    assert binary.read_bytes().startswith(b"\x7fELF")
    assert binary.stat().st_mode & 0o777 == 0o755


# -- pruning ----------------------------------------------------------------------------


def test_adopting_a_build_prunes_only_stale_builds_of_other_sources(cache: Path, tmp_path: Path) -> None:
    cache.mkdir(mode=0o755)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("keep me")
    age(outside, 5 * DAY)
    stale = build_dir(cache, "0123456789abcdef", days_old=3)
    stale_with_link = build_dir(cache, "3333333333333333", days_old=3)
    (stale_with_link / "link").symlink_to(outside / "victim")
    age(stale_with_link / "link", 3 * DAY)
    age(stale_with_link, 3 * DAY)
    fresh = build_dir(cache, "fedcba9876543210", days_old=0.5)
    # An older server's build: never touched by it, but its spawns keep the file's atime recent.
    in_use = build_dir(cache, "1111111111111111", days_old=3)
    os.utime(in_use / "agentflow-launch", (time.time(), time.time() - 3 * DAY))
    age(in_use, 3 * DAY, atime_too=False)
    link = cache / "2222222222222222"
    link.symlink_to(outside)
    age(link, 3 * DAY)
    not_a_build = build_dir(cache, "operator-notes", days_old=3)
    current = cache / launcher.cache_key()
    current.mkdir()
    (current / f".{launcher.NAME}.1.dead").write_bytes(b"a killed build's partial file")
    age(current / f".{launcher.NAME}.1.dead", 3 * DAY)
    (current / f".{launcher.NAME}.2.live").write_bytes(b"a build in progress")
    age(current, 3 * DAY)

    binary = current_binary()

    assert binary.parent == current
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [current.name, fresh.name, in_use.name, link.name, not_a_build.name]
    )
    assert not stale.exists()
    assert not stale_with_link.exists()
    assert link.is_symlink()
    assert (outside / "victim").read_text() == "keep me"
    assert sorted(p.name for p in current.iterdir()) == sorted([launcher.NAME, f".{launcher.NAME}.2.live"])
    assert time.time() - current.stat().st_mtime < DAY  # touched on adoption: pruners elsewhere keep it


def test_a_long_running_server_keeps_its_build_fresh_and_keeps_pruning(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = current_binary()
    monkeypatch.setattr(buildcache, "REFRESH_EVERY", 0.0)  # as if an hour passed between sessions
    age(binary.parent, 3 * DAY)
    stale = build_dir(cache, "0123456789abcdef", days_old=3)
    assert current_binary() == binary
    assert time.time() - binary.parent.stat().st_mtime < DAY
    assert not stale.exists()


def test_pruning_waits_for_no_one_and_removes_nothing_while_a_server_builds(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    stale = build_dir(root, "0123456789abcdef", days_old=3)
    with buildcache.builders_lock(root):
        assert buildcache.prune(root, keep="ffffffffffffffff") == []
        assert stale.exists()
    assert buildcache.prune(root, keep="ffffffffffffffff") == [stale.name]
    assert list(root.iterdir()) == []


def test_a_root_others_can_write_is_not_pruned(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    stale = build_dir(root, "0123456789abcdef", days_old=3)
    root.chmod(0o777)
    assert buildcache.prune(root, keep="ffffffffffffffff") == []
    assert stale.exists()


def test_the_gvisor_shim_is_pruned_and_rebuilt_the_same_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "gvisor-lib"
    monkeypatch.setattr(gvisor, "SHIM_DIR", root)
    monkeypatch.setattr(gvisor, "_shim", gvisor.shim_cache())
    stale = build_dir(root, "0123456789abcdef", days_old=3, file=gvisor.SHIM_NAME)
    fresh = build_dir(root, "fedcba9876543210", days_old=0.5, file=gvisor.SHIM_NAME)

    directory = gvisor.shim_dir()
    shim = directory / gvisor.SHIM_NAME
    assert directory.parent == root
    assert shim.read_bytes().startswith(b"\x7fELF")
    assert sorted(p.name for p in root.iterdir()) == sorted([directory.name, fresh.name])
    assert not stale.exists()

    shim.unlink()
    assert gvisor.shim_dir() == directory
    assert shim.read_bytes().startswith(b"\x7fELF")


async def test_a_session_whose_launcher_was_deleted_finds_it_again_at_its_next_spawn(
    cache: Path, make_box: BoxFactory, caplog: pytest.LogCaptureFixture
) -> None:
    box = await make_box("sandbox")
    assert await run(box, "echo one") == (0, "one\n")
    binary = current_binary()
    original = binary.read_bytes()
    binary.unlink()
    with caplog.at_level(logging.WARNING):
        assert await run(box, "echo two") == (0, "two\n")  # no new session set up in between
    assert "looking for it again" in caplog.text
    assert binary.read_bytes() == original
