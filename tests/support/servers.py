"""`agentflow-sandbox serve` subprocesses for tests (and the benchmarks).

Each server inherits this run's `AGENTFLOW_RUN_ID` and is noted as a server of the run,
so `leaks.session_pids()` counts its sessions even after it was killed outright.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx2
import pytest

from tests.support import leaks
from tests.support.manifests import write_manifest
from tests.support.polling import eventually_sync
from tests.support.ports import free_port

SERVER_START_TIMEOUT = 60.0  # generous: a loaded machine can take many seconds to import and bind
TOKEN_ENV = "AGENTFLOW_SANDBOX_TOKEN"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def server_command() -> list[str]:
    """argv that runs the `agentflow-sandbox` console script of the interpreter running the tests.

    The one beside `sys.executable` first (the venv's), so a different install on PATH
    never serves the tests.
    """
    for script in (str(Path(sys.executable).with_name("agentflow-sandbox")), shutil.which("agentflow-sandbox")):
        if script and Path(script).exists():
            return [script]
    return [sys.executable, "-m", "mcp_server"]


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    test_marker: str
    manifest: Path
    log_path: Path
    token: str | None = field(repr=False, default=None)
    state_home: Path | None = None
    _log: IO[bytes] | None = field(repr=False, default=None)

    @property
    def headers(self) -> dict[str, str]:
        """`Authorization: Bearer` with this server's token (empty for a --no-auth server)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def http_client(self, **headers: str) -> httpx2.AsyncClient:
        """An HTTP client for the MCP SDK's transports, sending the token (and `headers`)."""
        return httpx2.AsyncClient(headers={**self.headers, **headers}, timeout=httpx2.Timeout(30.0, read=300.0))

    @property
    def run_id(self) -> str:
        """The per-test marker its bash sessions carry (`leaks.session_pids(test_marker=...)`)."""
        return self.test_marker

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mcp_url(self) -> str:
        return f"{self.base}/mcp"

    @property
    def sse_url(self) -> str:
        return f"{self.base}/sse"

    def health(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"{self.base}/health", timeout=2) as response:
                status: dict[str, Any] = json.loads(response.read())
                return status
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server and reap it; SIGKILL (and fail) if it does not exit in time."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(sig)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
                    pytest.fail(f"server did not exit within {timeout:g}s of {sig.name}:\n{self.log()}")
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
        return int(self.process.returncode)


def start_http_server(
    directory: Path,
    *,
    session_ttl: float = 30.0,
    transport: str = "http",
    manifest: Path | None = None,
    token: str | None = "",
    server_settings: dict[str, Any] | None = None,
    extra_args: tuple[str, ...] = (),
    base_env: dict[str, str] | None = None,
) -> ServerProcess:
    """`agentflow-sandbox serve --transport http` on a free 127.0.0.1 port, healthy on return.

    Without `manifest`, one with a bash resource whose shells carry a fresh per-test marker
    (`server_settings` adds to its `[server]`). `token=""` (default): a fresh token in the
    server's AGENTFLOW_SANDBOX_TOKEN. `token=None`: no variable, so the server takes the
    manifest's tokens or generates one into its token file under `directory` (its
    XDG_STATE_HOME); `server.token` is then read from that file. `base_env` replaces this
    process's environment as the server's (e.g. a front end of a test Ray cluster, whose Ray
    settings must not mix with another cluster's this process may have joined).
    """
    marker = leaks.new_test_marker()
    if manifest is None:
        manifest = write_manifest(
            directory,
            session_ttl=session_ttl,
            test_marker=marker,
            name=f"manifest-{uuid.uuid4().hex[:8]}.json",
            server=server_settings,
        )
    log_path = directory / f"server-{marker}.log"
    state_home = directory / f"state-{marker}"
    env = {k: v for k, v in (os.environ if base_env is None else base_env).items() if k != TOKEN_ENV}
    env["XDG_STATE_HOME"] = str(state_home)
    if token == "":
        token = new_token()
    if token is not None:
        env[TOKEN_ENV] = token
    last_error = ""
    for _attempt in range(3):  # the free port can be taken between probe and bind: retry
        port = free_port()
        log_file = log_path.open("wb")
        argv = [*server_command(), "serve", "--transport", transport, "--manifest", str(manifest)]
        process = subprocess.Popen(
            [*argv, "--host", "127.0.0.1", "--port", str(port), *extra_args],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
        leaks.note_server(process.pid)
        server = ServerProcess(process, port, marker, manifest, log_path, token, state_home, log_file)

        def ready(server: ServerProcess = server) -> bool:
            if server.process.poll() is not None:
                return True  # exited: stop waiting, retry below
            status = server.health()
            return status is not None and status.get("status") == "running"

        eventually_sync(ready, SERVER_START_TIMEOUT, what=f"server on port {port} to become healthy")
        if process.poll() is None:
            generated = state_home / "agentflow-sandbox" / f"token-{port}"
            if token is None and generated.exists():
                server.token = generated.read_text().strip()
            return server
        last_error = server.log()
        with contextlib.suppress(Exception):
            server.stop(signal.SIGKILL)
    pytest.fail(f"HTTP server did not become healthy:\n{last_error}")


@contextlib.contextmanager
def running_http_server(directory: Path, *, session_ttl: float = 30.0, **options: Any) -> Iterator[ServerProcess]:
    """A started server (see `start_http_server` for `options`), stopped and its leftovers killed on exit."""
    server = start_http_server(directory, session_ttl=session_ttl, **options)
    try:
        yield server
    finally:
        try:
            server.stop()
        finally:
            leaks.kill_leftovers(test_marker=server.test_marker)
