"""Helpers for the transport / disconnect tests (also used by tests/external): server subprocesses, /proc.

Every server here runs on a manifest written to `tmp_path` whose bash config adds
`AGENTFLOW_TEST_RUN=<run id>` to the shell's environment. Each process a bash session
starts carries that plus `AGENTFLOW_SESSION=bash-...` (backends/processes.py), so
`session_pids(run_id)` finds exactly this test's bash processes even when other test
runs share the machine, including background jobs and children re-parented to init.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

SESSION_MARKER = b"AGENTFLOW_SESSION=bash-"
RUN_MARKER = "AGENTFLOW_TEST_RUN"
WORKER_META_KEY = "agentflow/worker_id"  # documented `_meta` key (mcp_server/worker_identity.py)

SERVER_START_TIMEOUT = 30.0
GONE_TIMEOUT = 15.0


# -- commands and manifests ----------------------------------------------------------


def server_command() -> list[str]:
    """argv that runs the `agentflow-sandbox` console script of the interpreter running the tests.

    The one beside `sys.executable` first (the venv's), so a different install on PATH
    never serves the tests.
    """
    for script in (str(Path(sys.executable).with_name("agentflow-sandbox")), shutil.which("agentflow-sandbox")):
        if script and Path(script).exists():
            return [script]
    return [sys.executable, "-m", "mcp_server"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_manifest(
    directory: Path,
    run_id: str,
    *,
    session_ttl: float = 30.0,
    disconnect_grace: float = 0.0,
    name: str = "manifest.json",
) -> Path:
    """A bash-only manifest. No disconnect grace unless asked (these tests watch disconnects end
    sessions), and no sandbox: they read the shell's host pid through `$$` (tests/security covers tiers)."""
    manifest = {
        "server": {
            "session_ttl": session_ttl,
            "disconnect_grace": disconnect_grace,
            "host": "127.0.0.1",
            "log_level": "WARNING",
        },
        "resources": {
            "bash": {
                "enabled": True,
                "config": {"timeout": 20, "env": {RUN_MARKER: run_id}},
                "policy": {"isolation": "none"},
            }
        },
    }
    path = directory / name
    path.write_text(json.dumps(manifest))
    return path


# -- the process table ---------------------------------------------------------------


def _environ(pid: int) -> list[bytes] | None:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


def session_pids(run_id: str | None = None, tag: str | None = None) -> list[int]:
    """Live (non-zombie) processes whose environ has `AGENTFLOW_SESSION=bash-...`.

    Narrowed to one test's server (`run_id`) and/or one session (`tag`, the full marker value).
    """
    run_needle = f"{RUN_MARKER}={run_id}".encode() if run_id else None
    tag_needle = f"AGENTFLOW_SESSION={tag}".encode() if tag else None
    me = os.getpid()
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        env = _environ(int(entry.name))
        if env is None or not any(item.startswith(SESSION_MARKER) for item in env):
            continue
        if run_needle is not None and run_needle not in env:
            continue
        if tag_needle is not None and tag_needle not in env:
            continue
        if not _is_zombie(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and not _is_zombie(pid)


async def wait_for(predicate: Callable[[], bool], within: float = GONE_TIMEOUT, what: str = "condition") -> None:
    """Poll `predicate` until true; fail with `what` after `within` seconds."""
    deadline = anyio.current_time() + within
    while not predicate():
        if anyio.current_time() > deadline:
            pytest.fail(f"timed out after {within:g}s waiting for {what}")
        await anyio.sleep(0.05)


async def wait_gone(run_id: str | None = None, tag: str | None = None, within: float = GONE_TIMEOUT) -> None:
    await wait_for(
        lambda: not session_pids(run_id, tag),
        within,
        f"bash processes (run={run_id}, tag={tag}) to exit; still alive: {session_pids(run_id, tag)}",
    )


# -- envelopes -----------------------------------------------------------------------


def envelope(result: Any) -> dict[str, Any]:
    """The structured envelope of a `CallToolResult`, checked against its text and is_error."""
    env = result.structured_content
    assert isinstance(env, dict), f"no structured_content in {result!r}"
    assert set(env) >= {"code", "message", "data", "meta"}, env
    assert result.content
    assert result.content[0].type == "text"
    assert result.content[0].text
    assert bool(result.is_error) == (env["code"] != 0), (result.is_error, env)
    return env


def ok(result: Any) -> dict[str, Any]:
    env = envelope(result)
    assert env["code"] == 0, env
    return env["data"]


# A command that reports the session marker and the shell's pid and starts a long background
# child, so the process-table checks also cover a session's descendants.
PROBE = 'sleep 300 & echo "$AGENTFLOW_SESSION $$ $PPID"'


def parse_probe(data: dict[str, Any]) -> tuple[str, int, int]:
    tag, shell_pid, parent_pid = data["stdout"].split()
    assert tag.startswith("bash-"), tag
    return tag, int(shell_pid), int(parent_pid)


# -- a server subprocess -------------------------------------------------------------


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    run_id: str
    manifest: Path
    log_path: Path
    _log: Any = field(repr=False, default=None)

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
                return json.loads(response.read())
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the server and wait; SIGKILL (and fail) if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
                pytest.fail(f"server did not exit within {timeout:g}s of {sig.name}:\n{self.log()}")
        if self._log is not None:
            self._log.close()
            self._log = None
        return int(self.process.returncode)


def start_http_server(tmp_path: Path, *, session_ttl: float = 30.0, transport: str = "http") -> ServerProcess:
    """`agentflow-sandbox serve --transport http` on a free 127.0.0.1 port, healthy on return."""
    run_id = uuid.uuid4().hex
    manifest = write_manifest(tmp_path, run_id, session_ttl=session_ttl, name=f"manifest-{run_id[:8]}.json")
    log_path = tmp_path / f"server-{run_id[:8]}.log"
    last_error = ""
    for _attempt in range(3):  # the free port can be taken between probe and bind: retry
        port = free_port()
        log_file = log_path.open("wb")
        process = subprocess.Popen(
            [
                *server_command(),
                "serve",
                "--transport",
                transport,
                "--manifest",
                str(manifest),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        server = ServerProcess(process, port, run_id, manifest, log_path, log_file)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            status = server.health()
            if status is not None and status.get("status") == "running":
                return server
            time.sleep(0.05)
        last_error = server.log()
        with contextlib.suppress(Exception):
            server.stop(signal.SIGKILL, 5)
    pytest.fail(f"HTTP server did not become healthy:\n{last_error}")


def kill_leftovers(run_id: str) -> list[int]:
    """SIGKILL whatever bash processes of `run_id` survived (so no test leaves any behind)."""
    leftovers = session_pids(run_id)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return leftovers


@contextlib.contextmanager
def running_http_server(directory: Path, *, session_ttl: float = 30.0) -> Iterator[ServerProcess]:
    server = start_http_server(directory, session_ttl=session_ttl)
    try:
        yield server
    finally:
        server.stop()
        kill_leftovers(server.run_id)
