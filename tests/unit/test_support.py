"""tests/support: the per-run leak helpers count only this run's processes and directories; polling."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process

from backends.processes import OWNER_FILE, SERVER_ENV_MARKER, SESSION_ENV_MARKER
from tests.support import leaks
from tests.support.manifests import TEST_MARKER_ENV
from tests.support.polling import eventually


@asynccontextmanager
async def sleeper(**env: str) -> AsyncIterator[Process]:
    """`sleep 300` with `env` added to ours, killed and reaped on exit.

    Without this run's id in its environment (bash sessions pass only a few variables on),
    so only the markers in `env` can make it this run's.
    """
    quiet = subprocess.DEVNULL
    base = {k: v for k, v in os.environ.items() if k != leaks.RUN_ID_ENV}
    process = await anyio.open_process(["sleep", "300"], env={**base, **env}, stdin=quiet, stdout=quiet, stderr=quiet)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):  # a test may have killed it already
            process.kill()
        await process.aclose()


async def test_run_id_is_set_before_tests_and_inherited_by_children() -> None:
    assert leaks.run_id().startswith("t")
    assert os.environ[leaks.RUN_ID_ENV] == leaks.run_id()
    marker = leaks.new_test_marker()
    assert marker.startswith(f"{leaks.run_id()}-")
    assert leaks.is_run_server_id(f"{leaks.run_id()}-{os.getpid()}-abcd")
    assert not leaks.is_run_server_id(f"tother-{os.getpid()}-abcd")


async def test_session_processes_of_this_run_are_found_and_another_runs_are_not() -> None:
    tag = f"bash-leaktest-{uuid.uuid4().hex[:8]}"
    mine = {SESSION_ENV_MARKER: tag, SERVER_ENV_MARKER: str(os.getpid())}
    # Another run's: its server is not ours, its marker names another run id, its env has another run id.
    theirs = {
        SESSION_ENV_MARKER: tag,
        SERVER_ENV_MARKER: "1",
        TEST_MARKER_ENV: "tforeign000-1234",
        leaks.RUN_ID_ENV: "tforeign000",
    }
    async with sleeper(**mine) as own, sleeper(**theirs) as other:
        found = await eventually(lambda: leaks.session_pids(tag), what="this run's sleeper")
        assert found == [own.pid]
        assert other.pid not in leaks.session_pids(tag_prefix="bash-leaktest-")
        assert leaks.session_pids(f"{tag}-no") == []
    await leaks.wait_gone(tag)


async def test_a_per_test_marker_narrows_to_that_tests_processes() -> None:
    tag = f"bash-leaktest-{uuid.uuid4().hex[:8]}"
    first, second = leaks.new_test_marker(), leaks.new_test_marker()
    async with (
        sleeper(**{SESSION_ENV_MARKER: tag, SERVER_ENV_MARKER: "1", TEST_MARKER_ENV: first}) as one,
        sleeper(**{SESSION_ENV_MARKER: tag, SERVER_ENV_MARKER: "1", TEST_MARKER_ENV: second}) as two,
    ):
        await eventually(lambda: len(leaks.session_pids(tag)) == 2, what="both sleepers")
        assert leaks.session_pids(test_marker=first) == [one.pid]
        assert leaks.session_pids(tag, test_marker=second) == [two.pid]
        assert sorted(leaks.kill_leftovers(test_marker=first)) == [one.pid]
        await eventually(lambda: leaks.session_pids(tag) == [two.pid], what="only the second left")


async def test_a_noted_server_owns_its_sessions_after_it_died() -> None:
    tag = f"bash-leaktest-{uuid.uuid4().hex[:8]}"
    async with await anyio.open_process(["true"], stdin=subprocess.DEVNULL) as server:
        await server.wait()
    async with sleeper(**{SESSION_ENV_MARKER: tag, SERVER_ENV_MARKER: str(server.pid)}) as orphan:
        assert leaks.session_pids(tag) == []  # an unknown server's: not this run's
        leaks.note_server(server.pid)
        assert leaks.session_pids(tag) == [orphan.pid]


def test_scratch_dirs_are_this_runs_only(tmp_path: Path) -> None:
    scratch_root = tmp_path / f"agentflow-{leaks.run_id()}-{os.getpid()}-ab12"
    scratch_root.mkdir()
    legacy_mine = tmp_path / "agentflow-bash-mine"
    legacy_mine.mkdir()
    (legacy_mine / OWNER_FILE).write_text(str(os.getpid()))
    legacy_theirs = tmp_path / "agentflow-bash-theirs"
    legacy_theirs.mkdir()
    (legacy_theirs / OWNER_FILE).write_text("1")
    (tmp_path / "agentflow-tforeign000-1-cd34").mkdir()
    assert leaks.scratch_dirs(tmp_path) == sorted([scratch_root, legacy_mine])


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_cgroup_dirs_follow_the_documented_layout(layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "memory" if layout == "v1" else tmp_path
    mine = base / "agentflow" / f"{leaks.run_id()}-{os.getpid()}-ab12"
    (mine / "bash-1").mkdir(parents=True)
    (base / "agentflow" / "tforeign000-1-cd34").mkdir(parents=True)
    monkeypatch.setattr(leaks, "CGROUP_ROOT", tmp_path)
    assert leaks.cgroup_dirs() == [mine]


async def test_eventually_returns_the_first_truthy_value_and_fails_naming_the_condition() -> None:
    calls: list[int] = []

    def third_time() -> str | None:
        calls.append(1)
        return "ready" if len(calls) >= 3 else None

    assert await eventually(third_time, every=0.001) == "ready"
    with pytest.raises(pytest.fail.Exception, match=r"timed out after 0\.05s waiting for the impossible"):
        await eventually(lambda: False, 0.05, 0.01, what=lambda: "the impossible")
