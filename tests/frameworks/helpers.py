"""Helpers of the framework tier: framework virtualenvs, a real HTTP server, probes run as subprocesses.

Each framework lives in its own virtualenv (`.venv-frameworks/<name>`, made by
`scripts/framework-venvs`, which `scripts/test` runs; conftest.py re-runs it, a no-op when
nothing changed). A probe in `clients/` runs there against a server started from this
checkout and prints JSON. The server gets a fresh bearer token through
AGENTFLOW_SANDBOX_TOKEN and so do the probes.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import leaks, procs
from tests.support.manifests import TEST_MARKER_ENV, write_manifest
from tests.support.servers import TOKEN_ENV, ServerProcess, start_http_server

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = Path(__file__).resolve().parent / "clients"
VENVS = ROOT / ".venv-frameworks"

SESSION_TTL = 10.0
DISCONNECT_GRACE = 5.0
GONE_TIMEOUT = 15.0
PROBE_TIMEOUT = 120.0


@dataclass
class SandboxServer:
    process: ServerProcess
    test_marker: str
    """In the environment of every bash session of this server (`leaks.session_pids(test_marker=...)`)."""

    @property
    def url(self) -> str:
        return self.process.mcp_url

    @property
    def token(self) -> str:
        assert self.process.token, "the framework tier runs servers with a token"
        return self.process.token

    @property
    def pid(self) -> int:
        return self.process.process.pid

    def session_pids(self, tag: str | None = None) -> list[int]:
        return leaks.session_pids(tag, test_marker=self.test_marker)

    def descendants(self) -> list[tuple[int, str]]:
        """(pid, name) of every live process below the server (desktops, shells, their children)."""
        return [(pid, procs.name(pid)) for pid in procs.descendants(self.pid)]


def framework_manifest(directory: Path, test_marker: str, resources: tuple[str, ...] = ("bash", "vm")) -> Path:
    """bash (its shells carry `test_marker`) and vm (screenshots), with short lifetimes."""
    available: dict[str, dict[str, Any]] = {
        "bash": {"enabled": True, "config": {"timeout": 20, "env": {TEST_MARKER_ENV: test_marker}}},
        "vm": {"enabled": True},
    }
    return write_manifest(
        directory,
        session_ttl=SESSION_TTL,
        disconnect_grace=DISCONNECT_GRACE,
        resources={name: available[name] for name in resources},
        name=f"manifest-{test_marker}.json",
    )


@contextlib.contextmanager
def sandbox_server(directory: Path) -> Iterator[SandboxServer]:
    """A streamable-HTTP server of this checkout with a fresh bearer token; stopped and swept after."""
    marker = leaks.new_test_marker()
    server = start_http_server(directory, manifest=framework_manifest(directory, marker))
    try:
        yield SandboxServer(server, marker)
    finally:
        try:
            server.stop()
        finally:
            leaks.kill_leftovers(test_marker=marker)


def run_probe(python: Path, script: str, target: str, token: str, *, stdin: bytes | None = None) -> Any:
    """Run `clients/<script>` in a framework venv with `target` (a URL, argv JSON, or none); its JSON output."""
    env = {**os.environ, TOKEN_ENV: token} if token else {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    env.pop("PYTHONPATH", None)  # the probe imports the framework venv's packages, never ours
    argv = [str(python), str(CLIENTS / script), *([target] if target else [])]
    try:
        completed = subprocess.run(
            argv, input=stdin, capture_output=True, env=env, cwd=CLIENTS, timeout=PROBE_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{script} did not finish within {PROBE_TIMEOUT:g}s: {exc.stderr!r}")
    stderr = completed.stderr.decode(errors="replace")[-4000:]
    assert completed.returncode == 0, f"{script} failed:\n{stderr}"
    return json.loads(completed.stdout)
