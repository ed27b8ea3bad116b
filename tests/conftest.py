"""Suite-wide setup: this run's id, shared fixtures, and a final sweep of what the run left.

The helpers themselves live in tests/support (one definition each).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.executors import ExecutorFactory
from tests.support import leaks, ray_cluster
from tests.support.manifests import write_manifest
from tests.support.ray_cluster import RayHead, joined, start_head, stop_head

log = logging.getLogger(__name__)


def pytest_configure(config: pytest.Config) -> None:
    # Before any test starts a server: every server (in-process or a subprocess inheriting
    # the environment) then names its ids, scratch root and cgroups after this run, and the
    # leak checks in tests/support/leaks.py count only what this run made.
    os.environ[leaks.RUN_ID_ENV] = leaks.new_run_id()
    ray_cluster.configure_environment()
    # (A run started with SIGINT ignored, e.g. `scripts/test &`, is fine: the bash backend
    # resets SIGINT for its shells; tests/backends/test_bash.py checks that.)


def pytest_report_header(config: pytest.Config) -> str:
    return f"agentflow test run id: {leaks.run_id()}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove what this run's sessions left (processes, scratch directories): nothing of it may
    disturb later runs on the machine. The tests' own leak checks are what fail on a leak."""
    leftovers = leaks.kill_leftovers()
    if leftovers:
        log.warning("run %s left session processes behind (killed): %s", leaks.run_id(), leftovers)
    for directory in leaks.scratch_dirs():
        log.warning("run %s left a scratch directory behind (removed): %s", leaks.run_id(), directory)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def bash_manifest(tmp_path: Path) -> Path:
    return write_manifest(tmp_path, resources={"bash": {"enabled": True, "config": {"timeout": 20}}})


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """One real single-node Ray cluster for the whole run, joined by this process as a front end."""
    # Not imported here: Ray reads its environment (loopback only, the token) when first imported.
    if importlib.util.find_spec("ray") is None:
        pytest.skip("the ray executor's tests need `pip install agentflow-sandbox[ray]`")
    head = start_head(tmp_path_factory.mktemp("ray"))
    try:
        with joined(head):
            yield head
            import ray

            ray.shutdown()
    finally:
        leftover = stop_head(head)
        if leftover:
            log.warning("the test Ray cluster needed SIGKILL for %d processes", len(leftover))


@pytest.fixture(params=["local", pytest.param("ray", marks=pytest.mark.slow)])
def executor(request: pytest.FixtureRequest) -> ExecutorFactory:
    """Open an executor for a manifest: the local engine, or a Ray front end on the run's cluster
    (a deployment of its own per test, stopped at its end)."""
    kind: str = request.param
    address = request.getfixturevalue("ray_head").address if kind == "ray" else None
    return ExecutorFactory(kind, address)
