"""Suite-wide setup: this run's id, shared fixtures, and a final sweep of what the run left.

The helpers themselves live in tests/support (one definition each).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.support import leaks
from tests.support.manifests import write_manifest

log = logging.getLogger(__name__)


def pytest_configure(config: pytest.Config) -> None:
    # Before any test starts a server: every server (in-process or a subprocess inheriting
    # the environment) then names its ids, scratch root and cgroups after this run, and the
    # leak checks in tests/support/leaks.py count only what this run made.
    os.environ[leaks.RUN_ID_ENV] = leaks.new_run_id()
    # Started in the background of a script (`cmd &`, as some CI runners do), this process
    # inherits SIGINT ignored, and so would every shell the sessions start: a bash that
    # ignores SIGINT cannot be interrupted, and the timeout and cancel tests then fail for
    # reasons outside the change. A handled signal is reset to default on exec; an ignored
    # one is not. (The servers themselves have the same exposure: see the report on issue 8.)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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
