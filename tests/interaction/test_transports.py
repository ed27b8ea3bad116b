"""Transports, protocol eras, worker identity and disconnect cleanup, through real MCP clients.

Every server is a real `agentflow-sandbox serve` subprocess; every client is the `mcp`
package's `Client` (never our `Sandbox`, which always sends a worker key). Process
checks read the process table (tests/support/leaks.py): a session's bash shell and a `sleep 300 &` it
started must both be gone once the session's owner is.

| kind         | client                                              | protocol   | worker          |
| stdio        | Client(StdioServerParameters)                       | 2026-07-28 | the pipe        |
| stdio-legacy | Client(StdioServerParameters, mode="legacy")        | 2025-11-25 | the pipe        |
| sse          | Client(sse_client(url))                             | 2026-07-28 | the SSE stream  |
| sse-legacy   | Client(sse_client(url), mode="legacy")              | 2025-11-25 | the SSE stream  |
| http-legacy  | Client(streamable_http_client(url), mode="legacy")  | 2025-11-25 | Mcp-Session-Id  |
| http         | Client(streamable_http_client(url))                 | 2026-07-28 | `_meta` key/TTL |

HTTP and SSE clients send the server's bearer token (`ServerProcess.headers`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import mcp_types as t
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import TextContent
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from tests.support import leaks
from tests.support.envelopes import PROBE, envelope, ok, parse_probe, worker_meta
from tests.support.leaks import kill_leftovers, session_pids, wait_gone
from tests.support.polling import eventually
from tests.support.procs import alive
from tests.support.servers import ServerProcess, running_http_server, server_command

pytestmark = pytest.mark.slow

MODERN = MODERN_PROTOCOL_VERSIONS[0]
META_TOOLS = {
    "create_session",
    "destroy_session",
    "list_sessions",
    "refresh_sessions",
    "reinitialize",
    "warmup",
    "get_status",
}
CONNECTED_KINDS = ["stdio", "stdio-legacy", "sse", "sse-legacy", "http-legacy"]
HTTP_KINDS = ["sse", "sse-legacy", "http-legacy", "http"]
STATE_COMMAND = "cd /tmp && export AF_STATE=kept-42; " + PROBE
STATE_CHECK = 'echo "$PWD ${AF_STATE:-unset} $AGENTFLOW_SESSION $$"'


def stdio_params(manifest: Path) -> StdioServerParameters:
    command = server_command()
    return StdioServerParameters(
        command=command[0], args=[*command[1:], "serve", "--transport", "stdio", "--manifest", str(manifest)]
    )


@asynccontextmanager
async def connect(
    kind: str, *, server: ServerProcess | None = None, manifest: Path | None = None, terminate_on_close: bool = True
) -> AsyncIterator[Client]:
    """A plain `mcp.Client` of `kind` (see the module docstring)."""
    legacy = kind.endswith("-legacy")
    mode = "legacy" if legacy else "auto"
    async with AsyncExitStack() as stack:
        if kind.startswith("stdio"):
            assert manifest is not None
            client = Client(stdio_params(manifest), mode=mode)
        else:
            assert server is not None
            if kind.startswith("sse"):
                client = Client(sse_client(server.sse_url, headers=server.headers), mode=mode)
            else:
                http = await stack.enter_async_context(server.http_client())
                transport = streamable_http_client(
                    server.mcp_url, http_client=http, terminate_on_close=terminate_on_close
                )
                client = Client(transport, mode=mode)
        await stack.enter_async_context(client)
        expected = "2025-11-25" if legacy else MODERN
        assert client.protocol_version == expected, (kind, client.protocol_version)
        yield client


# -- one connection = one worker: state persists, disconnect destroys -------------------------


@pytest.mark.parametrize("kind", CONNECTED_KINDS)
async def test_session_persists_and_dies_with_connection(
    kind: str, request: pytest.FixtureRequest, stdio_manifest: Path, run_id: str
) -> None:
    """No worker key: the connection is the worker; its session keeps state; leaving kills it."""
    server = None if kind.startswith("stdio") else request.getfixturevalue("http_server")
    run = run_id if server is None else server.run_id
    with anyio.fail_after(60):
        async with connect(kind, server=server, manifest=stdio_manifest) as client:
            created = ok(await client.call_tool("create_session", {"resource": "bash"}))
            session_id = created["session_id"]
            first = await client.call_tool("bash_run", {"command": STATE_COMMAND})
            env = envelope(first)
            assert env["code"] == 0, env
            assert env["meta"]["session_id"] == session_id
            assert env["meta"]["temporary_session"] is False
            assert env["meta"]["expires_at"]
            tag, shell_pid, _ = parse_probe(env["data"])
            second = ok(await client.call_tool("bash_run", {"command": STATE_CHECK}))
            assert second["stdout"] == f"/tmp kept-42 {tag} {shell_pid}\n"
            live = session_pids(tag, test_marker=run)
            assert shell_pid in live
            assert len(live) >= 2, f"expected the shell and its background sleep, got {live}"
            listed = ok(await client.call_tool("list_sessions", {}))["sessions"]
            assert [s["session_id"] for s in listed] == [session_id]
        await wait_gone(tag, test_marker=run)
        if server is not None:
            await eventually(lambda: server.health() is not None, 15, what="the server to stay healthy")


@pytest.mark.parametrize("kind", ["stdio", "sse"])
async def test_worker_key_on_a_connection_still_ends_with_it(
    kind: str, request: pytest.FixtureRequest, stdio_manifest: Path, run_id: str
) -> None:
    """With a `_meta` worker key the key names the worker, but the connection still decides its end."""
    server = None if kind.startswith("stdio") else request.getfixturevalue("http_server")
    run = run_id if server is None else server.run_id
    meta = worker_meta(f"conn-key-{os.urandom(12).hex()}")
    with anyio.fail_after(60):
        async with connect(kind, server=server, manifest=stdio_manifest) as client:
            ok(await client.call_tool("create_session", {"resource": "bash"}, meta=meta))
            tag, _, _ = parse_probe(ok(await client.call_tool("bash_run", {"command": STATE_COMMAND}, meta=meta)))
            again = ok(await client.call_tool("bash_run", {"command": STATE_CHECK}, meta=meta))
            assert again["stdout"].startswith(f"/tmp kept-42 {tag} ")
            assert session_pids(tag, test_marker=run)
        await wait_gone(tag, test_marker=run)


async def test_stdio_client_killed_abruptly(stdio_manifest: Path, run_id: str, tmp_path: Path) -> None:
    """SIGKILL the client process: the server sees EOF, destroys the session and exits."""
    child = Path(__file__).with_name("stdio_client_child.py")
    stderr_path = tmp_path / "child.stderr"
    with anyio.fail_after(60), stderr_path.open("wb") as stderr:
        process = await anyio.open_process(
            [sys.executable, str(child), str(stdio_manifest), *server_command()],
            stdin=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            assert process.stdout is not None
            buffer = b""
            while not buffer.endswith(b"\n"):
                chunk = await process.stdout.receive()
                buffer += chunk
            info = json.loads(buffer)
            assert info["meta"]["temporary_session"] is False
            assert info["meta"]["session_id"] == info["session_id"]
            assert info["shell_pid"] in session_pids(info["tag"], test_marker=run_id)
            leaks.note_server(info["server_pid"])
            assert alive(info["server_pid"])
            process.kill()
            await process.wait()
            await wait_gone(info["tag"], test_marker=run_id)
            await eventually(lambda: not alive(info["server_pid"]), 15, what="the orphaned stdio server to exit")
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()


# -- the stateless 2026-07-28 era ------------------------------------------------------------


async def test_stateless_http_without_worker_key(http_server: ServerProcess) -> None:
    """No key, no connection: create_session returns a handle that keeps state; calls without it are temporary."""
    with anyio.fail_after(30):
        async with connect("http", server=http_server) as client:
            first = envelope(await client.call_tool("bash_run", {"command": STATE_COMMAND}))
            assert first["code"] == 0, first
            assert first["meta"]["temporary_session"] is True
            assert first["meta"]["expires_at"] is None
            tag, _, _ = parse_probe(first["data"])
            # The temporary session (and the sleep it started) is gone before the result arrives.
            assert session_pids(tag, test_marker=http_server.run_id) == []

            created = await client.call_tool("create_session", {"resource": "bash"})
            handle = ok(created)["session_id"]
            assert any(handle in c.text for c in created.content if isinstance(c, t.TextContent))
            kept = envelope(await client.call_tool("bash_run", {"command": STATE_COMMAND, "session_id": handle}))
            assert kept["meta"]["session_id"] == handle
            assert kept["meta"]["temporary_session"] is False
            tag, shell_pid, _ = parse_probe(kept["data"])
        async with connect("http", server=http_server) as other:
            again = envelope(await other.call_tool("bash_run", {"command": STATE_CHECK, "session_id": handle}))
            assert again["data"]["stdout"] == f"/tmp kept-42 {tag} {shell_pid}\n"
            plain = envelope(await other.call_tool("bash_run", {"command": STATE_CHECK}))
            assert plain["meta"]["temporary_session"] is True
            assert ok(await other.call_tool("list_sessions", {}))["sessions"] == []
            assert [s["session_id"] for s in ok(await other.call_tool("list_sessions", {"all": True}))["sessions"]] == [
                handle
            ]
            ok(await other.call_tool("destroy_session", {"session_id": handle}))
            await wait_gone(tag, test_marker=http_server.run_id)
            gone = envelope(await other.call_tool("bash_run", {"command": "true", "session_id": handle}))
            assert gone["code"] == 1003


async def test_stateless_http_worker_key_persists_across_clients_and_expires(short_ttl_server: ServerProcess) -> None:
    """The `_meta` key is the worker across separate stateless clients; idle sessions die by TTL (2 s)."""
    meta = worker_meta(f"stateless-{os.urandom(8).hex()}")
    run = short_ttl_server.run_id
    with anyio.fail_after(45):
        async with connect("http", server=short_ttl_server) as first:
            created = ok(await first.call_tool("create_session", {"resource": "bash"}, meta=meta))
            env = envelope(await first.call_tool("bash_run", {"command": STATE_COMMAND}, meta=meta))
            assert env["meta"]["session_id"] == created["session_id"]
            assert env["meta"]["temporary_session"] is False
            assert env["meta"]["expires_at"]
            tag, shell_pid, _ = parse_probe(env["data"])
        # Leaving a stateless client is no signal: the session lives on.
        assert shell_pid in session_pids(tag, test_marker=run)
        async with connect("http", server=short_ttl_server) as second:
            again = envelope(await second.call_tool("bash_run", {"command": STATE_CHECK}, meta=meta))
            assert again["meta"]["session_id"] == created["session_id"]
            assert again["data"]["stdout"] == f"/tmp kept-42 {tag} {shell_pid}\n"
            listed = ok(await second.call_tool("list_sessions", {}, meta=meta))["sessions"]
            assert [s["session_id"] for s in listed] == [created["session_id"]]
            # Another stateless client without the key sees nothing.
            assert ok(await second.call_tool("list_sessions", {}))["sessions"] == []
        last_call = anyio.current_time()
        await wait_gone(tag, test_marker=run, within=15)
        assert anyio.current_time() - last_call >= 1.0, "reaped long before the 2 s TTL"
        async with connect("http", server=short_ttl_server) as third:
            assert ok(await third.call_tool("list_sessions", {}, meta=meta))["sessions"] == []
            gone = envelope(await third.call_tool("destroy_session", {"resource": "bash"}, meta=meta))
            assert gone["code"] == 1003, gone


async def test_handshake_http_client_vanishing_without_delete_is_reaped(short_ttl_server: ServerProcess) -> None:
    """An Mcp-Session-Id that is never DELETEd is closed after the idle timeout (= TTL), with its sessions."""
    run = short_ttl_server.run_id
    with anyio.fail_after(45):
        async with connect("http-legacy", server=short_ttl_server, terminate_on_close=False) as client:
            ok(await client.call_tool("create_session", {"resource": "bash"}))
            tag, shell_pid, _ = parse_probe(ok(await client.call_tool("bash_run", {"command": PROBE})))
        assert shell_pid in session_pids(tag, test_marker=run)
        await wait_gone(tag, test_marker=run, within=15)


# -- worker isolation ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sse", "http-legacy", "http"])
async def test_worker_isolation_across_connections(kind: str, http_server: ServerProcess) -> None:
    """B cannot list, use or destroy A's session (two connections, or two keys on stateless HTTP)."""
    meta_a = worker_meta(f"worker-a-{os.urandom(12).hex()}") if kind == "http" else None
    meta_b = worker_meta(f"worker-b-{os.urandom(12).hex()}") if kind == "http" else None
    with anyio.fail_after(45):
        async with connect(kind, server=http_server) as a, connect(kind, server=http_server) as b:
            created = ok(await a.call_tool("create_session", {"resource": "bash"}, meta=meta_a))
            tag, shell_pid, _ = parse_probe(ok(await a.call_tool("bash_run", {"command": STATE_COMMAND}, meta=meta_a)))

            assert ok(await b.call_tool("list_sessions", {}, meta=meta_b))["sessions"] == []
            destroyed = envelope(await b.call_tool("destroy_session", {"resource": "bash"}, meta=meta_b))
            assert destroyed["code"] == 1003, destroyed
            used = envelope(await b.call_tool("bash_run", {"command": STATE_CHECK}, meta=meta_b))
            assert used["code"] == 0
            assert used["meta"]["temporary_session"] is True
            assert used["meta"]["session_id"] != created["session_id"]
            assert "kept-42" not in used["data"]["stdout"]
            assert tag not in used["data"]["stdout"]
            status = ok(await b.call_tool("get_status", {}, meta=meta_b))
            assert status.get("your_sessions", []) == []

            # A's session is untouched.
            assert shell_pid in session_pids(tag, test_marker=http_server.run_id)
            still = ok(await a.call_tool("bash_run", {"command": STATE_CHECK}, meta=meta_a))
            assert still["stdout"] == f"/tmp kept-42 {tag} {shell_pid}\n"
            ok(await a.call_tool("destroy_session", {"resource": "bash"}, meta=meta_a))
            await wait_gone(tag, test_marker=http_server.run_id)


# -- server shutdown -------------------------------------------------------------------------


async def test_http_server_sigterm_leaves_no_bash_process(tmp_path: Path) -> None:
    """SIGTERM with live sessions of every HTTP kind (one still connected): afterwards no bash process."""
    with anyio.fail_after(60), running_http_server(tmp_path) as server:
        tags: list[str] = []
        meta = worker_meta(f"shutdown-{os.urandom(12).hex()}")
        async with connect("http", server=server) as modern:
            ok(await modern.call_tool("create_session", {"resource": "bash"}, meta=meta))
            tags.append(parse_probe(ok(await modern.call_tool("bash_run", {"command": PROBE}, meta=meta)))[0])
        async with connect("http-legacy", server=server, terminate_on_close=False) as legacy:
            ok(await legacy.call_tool("create_session", {"resource": "bash"}))
            tags.append(parse_probe(ok(await legacy.call_tool("bash_run", {"command": PROBE})))[0])
        assert all(session_pids(tag, test_marker=server.run_id) for tag in tags)
        assert server.health() == {"status": "running"}

        returncode = await anyio.to_thread.run_sync(server.stop, signal.SIGTERM, 20.0)
        leftovers = session_pids(test_marker=server.run_id)
        assert leftovers == [], (
            f"bash processes survived SIGTERM of the HTTP server (exit status {returncode}): "
            f"{leftovers}\n{server.log()}"
        )
        # A graceful shutdown exits 0 (not killed by its own re-raised SIGTERM).
        assert returncode == 0, server.log()


def _rpc(method: str, params: dict[str, Any], request_id: int | None = None) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params}
    if request_id is not None:
        message["id"] = request_id
    return (json.dumps(message) + "\n").encode()


@pytest.mark.parametrize("how", ["stdin-eof", "sigterm"])
async def test_stdio_server_shutdown_leaves_no_bash_process(
    how: str, stdio_manifest: Path, run_id: str, tmp_path: Path
) -> None:
    """A stdio server driven by raw JSON-RPC: on stdin EOF (or SIGTERM) it exits 0 and kills its sessions."""
    stderr_path = tmp_path / "server.stderr"
    with anyio.fail_after(60), stderr_path.open("wb") as stderr:
        process = await anyio.open_process(
            [*server_command(), "serve", "--transport", "stdio", "--manifest", str(stdio_manifest)],
            stderr=stderr,
        )
        try:
            assert process.stdin is not None
            assert process.stdout is not None
            lines = process.stdout
            buffered = b""

            async def response(request_id: int) -> dict[str, Any]:
                nonlocal buffered
                while True:
                    while b"\n" in buffered:
                        line, buffered = buffered.split(b"\n", 1)
                        message = json.loads(line)
                        if message.get("id") == request_id:
                            return message
                    buffered += await lines.receive()

            init = {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "raw-jsonrpc-test", "version": "0"},
            }
            await process.stdin.send(_rpc("initialize", init, 1))
            assert (await response(1))["result"]["serverInfo"]["name"] == "agentflow-sandbox"
            await process.stdin.send(_rpc("notifications/initialized", {}))
            create = {"name": "create_session", "arguments": {"resource": "bash"}}
            await process.stdin.send(_rpc("tools/call", create, 2))
            assert (await response(2))["result"]["structuredContent"]["code"] == 0
            await process.stdin.send(_rpc("tools/call", {"name": "bash_run", "arguments": {"command": PROBE}}, 3))
            result = (await response(3))["result"]
            assert result["isError"] is False
            tag, shell_pid, server_pid = parse_probe(result["structuredContent"]["data"])
            assert server_pid == process.pid
            assert shell_pid in session_pids(tag, test_marker=run_id)

            if how == "stdin-eof":
                await process.stdin.aclose()
            else:
                process.send_signal(signal.SIGTERM)
            await wait_gone(test_marker=run_id, within=10)
            with anyio.move_on_after(10):
                await process.wait()
            log = stderr_path.read_text(errors="replace")[-3000:]
            if process.returncode is None:
                pytest.fail(f"the stdio server did not exit within 10 s of {how} (its stdin still open):\n{log}")
            assert process.returncode == 0, log
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()
            kill_leftovers(test_marker=run_id)


# -- tool listing and result shape -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["stdio", *HTTP_KINDS])
async def test_tools_list_and_result_shape(kind: str, request: pytest.FixtureRequest, stdio_manifest: Path) -> None:
    """tools/list has bash_run and the meta-tools with object schemas; results are envelopes + text."""
    server = None if kind.startswith("stdio") else request.getfixturevalue("http_server")
    with anyio.fail_after(45):
        async with connect(kind, server=server, manifest=stdio_manifest) as client:
            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
            assert {"bash_run", *META_TOOLS} <= set(tools)
            for tool in tools.values():
                assert tool.input_schema["type"] == "object", tool.name
                assert tool.description
            run_schema = tools["bash_run"].input_schema
            assert "command" in run_schema["properties"]
            assert "command" in run_schema.get("required", [])
            assert "resource" in tools["create_session"].input_schema["properties"]

            result = await client.call_tool("bash_run", {"command": "echo hi; echo oops >&2; exit 3"})
            env = envelope(result)
            assert env["code"] == 0
            assert result.is_error is False
            assert env["data"]["stdout"] == "hi\n"
            assert env["data"]["stderr"] == "oops\n"
            assert env["data"]["exit_code"] == 3
            assert env["meta"]["tool"] in ("run", "bash_run")
            assert env["meta"]["resource_type"] == "bash"
            assert isinstance(env["meta"]["execution_time_ms"], int | float)
            first = result.content[0]
            assert isinstance(first, TextContent)
            assert "hi" in first.text

            cases: list[tuple[str, dict[str, Any], int]] = [
                ("bash_nope", {"command": "true"}, 1001),
                ("bash_run", {}, 1002),
                ("bash_run", {"command": 7}, 1002),
                ("create_session", {"resource": "nosuchresource"}, 1005),
                ("no_such_tool", {}, 1001),
            ]
            for name, args, code in cases:
                bad = await client.call_tool(name, args)
                env = envelope(bad)
                assert bad.is_error is True, (name, env)
                assert env["code"] == code, (name, args, env)
                assert env["message"]
