"""Fixtures for the transport tests; the helpers live in transport_helpers.py (importable by name)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from transport_helpers import ServerProcess, kill_leftovers, running_http_server, write_manifest


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
    """A run id for a stdio server's manifest; its leftovers are killed at the end."""
    value = uuid.uuid4().hex
    yield value
    kill_leftovers(value)


@pytest.fixture
def stdio_manifest(tmp_path: Path, run_id: str) -> Path:
    return write_manifest(tmp_path, run_id, session_ttl=30.0)
