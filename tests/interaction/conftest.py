"""Fixtures for the transport tests; the helpers live in tests/support."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import leaks
from tests.support.manifests import write_manifest
from tests.support.servers import ServerProcess, running_http_server


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One HTTP server (TTL 30 s) shared by a module's tests; each test checks its own sessions by tag."""
    with running_http_server(tmp_path_factory.mktemp("http")) as server:
        yield server


@pytest.fixture
def short_ttl_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """An HTTP server whose sessions (and idle MCP sessions) expire after 2 s."""
    with running_http_server(tmp_path, session_ttl=2.0) as server:
        yield server


@pytest.fixture
def run_id() -> Iterator[str]:
    """A per-test marker for a stdio server's manifest; its leftovers are killed at the end."""
    value = leaks.new_test_marker()
    yield value
    leaks.kill_leftovers(test_marker=value)


@pytest.fixture
def stdio_manifest(tmp_path: Path, run_id: str) -> Path:
    return write_manifest(tmp_path, session_ttl=30.0, test_marker=run_id)
