"""MCP clients we did not write drive the server: the official TypeScript SDK and MCP Inspector's CLI.

`client.mjs` (the `@modelcontextprotocol/sdk` client, versions pinned in package.json and
package-lock.json) lists tools, calls `bash_run`, creates a session and runs two commands in
it, then holds the connection until told to close, so the process table can be checked
while it is connected and after it has gone. The TS SDK speaks only the handshake revisions,
so over HTTP it gets an Mcp-Session-Id: one TS client = one worker.

Needs Node >= 20 and npm; `npm ci` runs into tests/external/node_modules when it is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.support.leaks import kill_leftovers, new_test_marker, session_pids, wait_gone
from tests.support.manifests import write_manifest
from tests.support.polling import eventually
from tests.support.servers import TOKEN_ENV, ServerProcess, running_http_server, server_command

pytestmark = pytest.mark.slow

EXTERNAL = Path(__file__).resolve().parent
NODE_MODULES = EXTERNAL / "node_modules"
SDK_PACKAGE = NODE_MODULES / "@modelcontextprotocol" / "sdk" / "package.json"
INSPECTOR_BUILD = NODE_MODULES / "@modelcontextprotocol" / "inspector-cli" / "build"
META_TOOLS = {"create_session", "destroy_session", "list_sessions", "refresh_sessions", "reinitialize"}


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with tests/external/node_modules installed from the lockfile."""
    node_bin, npm = shutil.which("node"), shutil.which("npm")
    if node_bin is None or npm is None:
        pytest.skip("node/npm not installed: the third-party MCP client tests need Node >= 20 and npm")
    if not SDK_PACKAGE.exists() or not INSPECTOR_BUILD.exists():
        command = [npm, "ci"] if (EXTERNAL / "package-lock.json").exists() else [npm, "install"]
        subprocess.run([*command, "--no-audit", "--no-fund"], cwd=EXTERNAL, check=True, timeout=300)
    return node_bin


@pytest.fixture(scope="module")
def external_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_http_server(tmp_path_factory.mktemp("external-http")) as server:
        yield server


@pytest.fixture
def stdio_run(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(run id, manifest) for a stdio server spawned by the external client."""
    run_id = new_test_marker()
    manifest = write_manifest(tmp_path, session_ttl=30.0, test_marker=run_id)
    yield run_id, manifest
    kill_leftovers(test_marker=run_id)


def stdio_target(manifest: Path) -> list[str]:
    return ["--stdio", *server_command(), "serve", "--transport", "stdio", "--manifest", str(manifest)]


async def _read_json_line(stream: Any, buffer: bytearray) -> dict[str, Any]:
    while b"\n" not in buffer:
        chunk = await stream.receive()
        buffer.extend(chunk)
    index = buffer.index(b"\n")
    line = bytes(buffer[:index])
    del buffer[: index + 1]
    return json.loads(line)


def check_results(out: dict[str, Any]) -> tuple[str, int]:
    """Assert on client.mjs output; return (session marker tag, shell pid) of its explicit session."""
    assert "error" not in out, out.get("error")
    assert out["serverVersion"]["name"] == "agentflow-sandbox"
    tools = {tool["name"]: tool for tool in out["tools"]}
    assert {"bash_run", *META_TOOLS} <= set(tools)
    assert tools["bash_run"]["inputSchema"]["type"] == "object"
    assert "command" in tools["bash_run"]["inputSchema"]["required"]

    hi = out["hi"]
    assert hi["isError"] is False
    assert hi["structuredContent"]["code"] == 0
    assert hi["structuredContent"]["data"]["stdout"] == "hi\n"
    assert hi["structuredContent"]["meta"]["temporary_session"] is True
    assert hi["content"][0]["type"] == "text"

    created = out["create"]["structuredContent"]
    assert created["code"] == 0, created
    session_id = created["data"]["session_id"]
    first, second = out["first"]["structuredContent"], out["second"]["structuredContent"]
    for env in (first, second):
        assert env["code"] == 0, env
        assert env["meta"]["session_id"] == session_id
        assert env["meta"]["temporary_session"] is False
    tag, shell_pid = first["data"]["stdout"].split()
    assert second["data"]["stdout"] == f"/tmp ts-state {tag} {shell_pid}\n"

    unknown = out["unknown"]
    assert unknown["isError"] is True
    assert unknown["structuredContent"]["code"] == 1001
    return tag, int(shell_pid)


def client_env(token: str | None) -> dict[str, str]:
    """The environment for client.mjs: the server's token, or none at all."""
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    if token:
        env[TOKEN_ENV] = token
    return env


async def drive(
    node: str,
    target: list[str],
    run_id: str,
    tmp_path: Path,
    *,
    gone_within: float = 15.0,
    token: str | None = None,
) -> dict[str, Any]:
    """Run client.mjs --hold against `target`; check processes while connected and after it closes."""
    stderr_path = tmp_path / "client.stderr"
    with anyio.fail_after(60), stderr_path.open("wb") as stderr:
        process = await anyio.open_process(
            [node, str(EXTERNAL / "client.mjs"), "--hold", *target], cwd=EXTERNAL, stderr=stderr, env=client_env(token)
        )
        try:
            assert process.stdin is not None
            assert process.stdout is not None
            buffer = bytearray()
            try:
                out = await _read_json_line(process.stdout, buffer)
            except anyio.EndOfStream:
                pytest.fail(f"client.mjs printed nothing:\n{stderr_path.read_text(errors='replace')[-3000:]}")
            tag, shell_pid = check_results(out)
            live = session_pids(tag, test_marker=run_id)
            assert shell_pid in live
            assert len(live) >= 2, f"the shell and its background sleep, got {live}"

            await process.stdin.send(b"close\n")
            closed = await _read_json_line(process.stdout, buffer)
            assert closed["closed"] is True
            assert await process.wait() == 0, stderr_path.read_text(errors="replace")[-3000:]
            await wait_gone(tag, test_marker=run_id, within=gone_within)
            return {**out, **closed}
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()


async def test_ts_sdk_client_over_stdio(node: str, stdio_run: tuple[str, Path], tmp_path: Path) -> None:
    run_id, manifest = stdio_run
    out = await drive(node, stdio_target(manifest), run_id, tmp_path)
    assert out["transport"] == "stdio"


async def test_ts_sdk_client_over_streamable_http(node: str, external_server: ServerProcess, tmp_path: Path) -> None:
    """A TS client that ends its MCP session (DELETE via terminateSession) loses its sessions at once."""
    target = ["--http", external_server.mcp_url]
    out = await drive(node, target, external_server.run_id, tmp_path, token=external_server.token)
    assert out["sessionId"], "the TS SDK client should have been given an Mcp-Session-Id"
    assert out["protocolVersion"] in ("2025-11-25", "2025-06-18")
    assert out["terminated"] is True


async def test_ts_sdk_client_closing_without_delete_is_reaped(node: str, tmp_path: Path) -> None:
    """The TS SDK's close() sends no DELETE: the MCP session idles out after the TTL (2 s) with its sessions."""
    with running_http_server(tmp_path, session_ttl=2.0) as server:
        target = ["--no-terminate", "--http", server.mcp_url]
        out = await drive(node, target, server.run_id, tmp_path, gone_within=15.0, token=server.token)
        assert out["terminated"] is False
        await eventually(lambda: not session_pids(test_marker=server.run_id), 15, what="no bash process left")


async def test_ts_sdk_client_over_sse(node: str, external_server: ServerProcess, tmp_path: Path) -> None:
    target = ["--sse", external_server.sse_url]
    out = await drive(node, target, external_server.run_id, tmp_path, token=external_server.token)
    assert out["transport"] == "sse"


@pytest.mark.parametrize("kind", ["http", "sse"])
async def test_ts_sdk_client_without_token_is_refused(
    kind: str, node: str, external_server: ServerProcess, tmp_path: Path
) -> None:
    """The TS SDK without a token fails to connect, with the server's 401 in its error."""
    url = external_server.mcp_url if kind == "http" else external_server.sse_url
    completed = await anyio.run_process(
        [node, str(EXTERNAL / "client.mjs"), f"--{kind}", url], cwd=EXTERNAL, env=client_env(None), check=False
    )
    assert completed.returncode != 0
    error = json.loads(completed.stdout.decode().splitlines()[-1])["error"]
    assert "401" in error or "unauthorized" in error.lower(), error
    assert session_pids(test_marker=external_server.run_id) == []


# -- MCP Inspector CLI (@modelcontextprotocol/inspector-cli 1.0.x, Node 20) ---------------------


def inspector(node: str, target: list[str], *method: str, token: str | None = None) -> dict[str, Any]:
    """Run the inspector CLI from its build folder (it reads ../package.json relative to the cwd)."""
    auth = ["--header", f"Authorization: Bearer {token}"] if token else []
    completed = subprocess.run(
        [node, str(INSPECTOR_BUILD / "index.js"), *target, *auth, *method],
        cwd=INSPECTOR_BUILD,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr.decode(errors="replace")[-3000:]
    return json.loads(completed.stdout)


def test_inspector_cli_over_stdio(node: str, stdio_run: tuple[str, Path]) -> None:
    _, manifest = stdio_run
    # The server command first, its own flags after `--` (else the inspector takes --transport for itself).
    target = [*server_command(), "--method", "tools/call", "--tool-name", "bash_run", "--tool-arg", "command=echo hi"]
    result = inspector(node, [*target, "--", "serve", "--transport", "stdio", "--manifest", str(manifest)])
    assert result["isError"] is False
    assert result["structuredContent"]["data"]["stdout"] == "hi\n"


def test_inspector_cli_over_streamable_http(node: str, external_server: ServerProcess) -> None:
    token = external_server.token
    listed = inspector(node, [external_server.mcp_url], "--method", "tools/list", token=token)
    assert {"bash_run", *META_TOOLS} <= {tool["name"] for tool in listed["tools"]}
    called = inspector(
        node,
        [external_server.mcp_url],
        *("--method", "tools/call", "--tool-name", "bash_run", "--tool-arg", "command=echo hi"),
        token=token,
    )
    assert called["structuredContent"]["code"] == 0
    assert called["structuredContent"]["data"]["stdout"] == "hi\n"
