"""Helpers of the framework tier: framework virtualenvs, a real HTTP server, probes run as subprocesses.

Each framework lives in its own virtualenv (`.venv-frameworks/<name>`, made by
`scripts/framework-venvs`, which `scripts/test` runs; a missing one is made here). A probe in
`clients/` runs there against a server started from this checkout and prints JSON.
The server gets a bearer token through AGENTFLOW_SANDBOX_TOKEN and so do the probes
(a server without authentication ignores it).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from manifests.schema import ServerSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "interaction"))
from transport_helpers import (  # re-exported for the tests
    GONE_TIMEOUT,
    RUN_MARKER,
    SERVER_START_TIMEOUT,
    ServerProcess,
    free_port,
    kill_leftovers,
    server_command,
    session_pids,
    wait_for,
)

__all__ = ["GONE_TIMEOUT", "session_pids", "wait_for"]

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = Path(__file__).resolve().parent / "clients"
VENVS = ROOT / ".venv-frameworks"
TOKEN_VARIABLE = "AGENTFLOW_SANDBOX_TOKEN"

SESSION_TTL = 10.0
DISCONNECT_GRACE = 5.0
PROBE_TIMEOUT = 120.0


@dataclass
class SandboxServer:
    process: ServerProcess
    token: str

    @property
    def url(self) -> str:
        return self.process.mcp_url

    @property
    def run_id(self) -> str:
        return self.process.run_id

    @property
    def pid(self) -> int:
        return self.process.process.pid


def write_manifest(directory: Path, run_id: str) -> Path:
    """bash (tagged with the run id, for the process table) and vm (screenshots); short lifetimes."""
    server: dict[str, Any] = {"session_ttl": SESSION_TTL, "host": "127.0.0.1", "log_level": "WARNING"}
    if "disconnect_grace" in ServerSettings.model_fields:  # from the session-handle contract on
        server["disconnect_grace"] = DISCONNECT_GRACE
    manifest = {
        "server": server,
        "resources": {
            "bash": {"enabled": True, "config": {"timeout": 20, "env": {RUN_MARKER: run_id}}},
            "vm": {"enabled": True},
        },
    }
    path = directory / f"manifest-{run_id[:8]}.json"
    path.write_text(json.dumps(manifest))
    return path


def _start(directory: Path, token: str) -> ServerProcess:
    run_id = uuid.uuid4().hex
    manifest = write_manifest(directory, run_id)
    log_path = directory / f"server-{run_id[:8]}.log"
    # XDG_STATE_HOME: whatever the server keeps there (a token file) stays in the test's directory.
    env = {**os.environ, TOKEN_VARIABLE: token, "XDG_STATE_HOME": str(directory / "state")}
    last_log = ""
    for _attempt in range(3):  # the free port can be taken between probe and bind: retry
        port = free_port()
        log_file = log_path.open("wb")
        process = subprocess.Popen(
            [*server_command(), "serve", "--transport", "http", "--manifest", str(manifest), "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
        server = ServerProcess(
            process=process, port=port, run_id=run_id, manifest=manifest, log_path=log_path, _log=log_file
        )
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            status = server.health()
            if status is not None and status.get("status") == "running":
                return server
            time.sleep(0.05)
        last_log = server.log()
        with contextlib.suppress(Exception):
            server.stop(signal.SIGKILL, 5)
    pytest.fail(f"HTTP server did not become healthy:\n{last_log}")


@contextlib.contextmanager
def sandbox_server(directory: Path) -> Iterator[SandboxServer]:
    """A streamable-HTTP server of this checkout, with a fresh bearer token; stopped and swept after."""
    token = secrets.token_urlsafe(32)
    process = _start(directory, token)
    try:
        yield SandboxServer(process, token)
    finally:
        process.stop()
        kill_leftovers(process.run_id)


def run_probe(python: Path, script: str, url: str, token: str, *, stdin: bytes | None = None) -> Any:
    """Run `clients/<script>` in a framework venv; its JSON output (URL appended unless empty)."""
    env = {**os.environ, TOKEN_VARIABLE: token}
    env.pop("PYTHONPATH", None)  # the probe imports the framework venv's packages, never ours
    argv = [str(python), str(CLIENTS / script), *([url] if url else [])]
    try:
        completed = subprocess.run(
            argv, input=stdin, capture_output=True, env=env, cwd=CLIENTS, timeout=PROBE_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{script} did not finish within {PROBE_TIMEOUT:g}s: {exc.stderr!r}")
    stderr = completed.stderr.decode(errors="replace")[-4000:]
    assert completed.returncode == 0, f"{script} failed:\n{stderr}"
    return json.loads(completed.stdout)


def server_descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command) of every live process below `pid` (desktops, shells, their children)."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        head, _, tail = stat.rpartition(")")
        fields = tail.split()
        if fields[0] in ("Z", "X"):
            continue
        parents[int(entry.name)] = int(fields[1])
        names[int(entry.name)] = head.partition("(")[2]
    found: list[tuple[int, str]] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent:
                found.append((child, names[child]))
                frontier.append(child)
    return sorted(found)
