"""`Sandbox(url)`'s light HTTP path (sandbox/light_http.py) against real servers, and against broken ones.

The real server runs as a subprocess (tests/support/servers.py); the "server that does not
speak 2026-07-28" is the real app in-process behind a middleware that hides the revision's
header, so the SDK's handshake era answers; the broken servers are a few lines of raw HTTP.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import socket
import typing
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc
import mcp_types as t
import psutil
import pytest
import uvicorn
from mcp import Client
from starlette.types import ASGIApp, Receive, Scope, Send

from manifests import load_manifest
from mcp_server.app import build_server
from mcp_server.factory import engine_from_manifest
from mcp_server.transports import authenticated_app, http_app
from sandbox import Sandbox, SandboxError, light_http
from sandbox.client import _envelope_of, _envelope_of_wire
from sandbox.light_http import PROTOCOL_VERSION
from session.errors import PermissionDenied, ServiceUnavailable
from tests.support import procs
from tests.support.leaks import session_pids
from tests.support.polling import eventually, eventually_sync
from tests.support.ports import free_port
from tests.support.servers import ServerProcess, new_token, running_http_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real HTTP server with a bearer token, shared by this module's tests."""
    with running_http_server(tmp_path_factory.mktemp("light")) as served:
        yield served


def _client_connections(port: int) -> int:
    """This process's open TCP connections to `port` (the pool's, in these tests)."""
    return sum(
        1
        for conn in psutil.Process().net_connections(kind="tcp")
        if conn.raddr and conn.raddr.port == port and conn.status == psutil.CONN_ESTABLISHED
    )


async def test_sandbox_url_takes_the_light_path_by_default(server: ServerProcess) -> None:
    async with Sandbox(url=server.mcp_url, token=server.token) as sandbox:
        assert sandbox._light is not None  # no SDK client (and no owner task) behind it
        assert sandbox._client is None
        await sandbox.create_session("bash", {"cwd": "/tmp"})
        first = await sandbox.execute("bash:run", {"command": "cd /; export SEEN=1"})
        second = await sandbox.execute("bash:run", {"command": "pwd; echo $SEEN"})
        assert second["data"]["stdout"] == "/\n1\n"  # the worker key kept the session across POSTs
        assert first["meta"]["session_id"] == second["meta"]["session_id"]
        assert [s["resource_type"] for s in (await sandbox.list_sessions())["sessions"]] == ["bash"]
        tools = {t["name"]: t for t in await sandbox.get_tools()}
        assert tools["bash:run"]["mcp_name"] == "bash_run"
        assert "command" in tools["bash:run"]["input_schema"]["properties"]
        with pytest.raises(SandboxError) as caught:
            await sandbox.create_session("nonexistent")
        assert caught.value.code == 1005
    # leaving destroyed the worker's sessions
    async with Sandbox(url=server.mcp_url, token=server.token, mode="legacy") as legacy:
        assert legacy._light is None
        assert legacy._client is not None
        assert (await legacy.execute("bash:run", {"command": "echo legacy"}))["data"]["stdout"] == "legacy\n"


async def test_pinned_revision_takes_the_light_path_without_a_probe(server: ServerProcess) -> None:
    async with Sandbox(url=server.mcp_url, token=server.token, mode=PROTOCOL_VERSION) as sandbox:
        assert sandbox._light is not None
        assert (await sandbox.execute("bash:run", {"command": "echo pinned"}))["data"]["stdout"] == "pinned\n"


async def test_tokens_from_argument_and_environment_and_a_wrong_one_is_1006(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server.token is not None
    monkeypatch.setenv("AGENTFLOW_SANDBOX_TOKEN", server.token)
    async with Sandbox(url=server.mcp_url) as sandbox:
        assert (await sandbox.execute("bash:run", {"command": "echo env"}))["data"]["stdout"] == "env\n"
    with pytest.raises(PermissionDenied) as refused:
        async with Sandbox(url=server.mcp_url, token=new_token()):
            pass
    assert refused.value.code == 1006
    assert "token argument" in str(refused.value)
    # a refused token is not cached as the server's answer: the right one still works at once
    async with Sandbox(url=server.mcp_url, token=server.token) as sandbox:
        assert (await sandbox.execute("bash:run", {"command": "echo ok"}))["data"]["stdout"] == "ok\n"


async def test_a_token_refused_between_calls_is_1006_too(server: ServerProcess) -> None:
    async with Sandbox(url=server.mcp_url, token=server.token) as sandbox:
        assert sandbox._light is not None
        sandbox._light._headers["Authorization"] = f"Bearer {new_token()}"  # as if the token were revoked
        with pytest.raises(PermissionDenied) as refused:
            await sandbox.execute("bash:run", {"command": "echo never"})
        assert refused.value.code == 1006


async def test_progress_reaches_the_callback_over_an_event_stream(server: ServerProcess) -> None:
    reports: list[tuple[float, float | None, str | None]] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        reports.append((done, total, message))

    async with Sandbox(url=server.mcp_url, token=server.token) as sandbox:
        await sandbox.create_session("bash", {"progress_interval": 0.3})
        result = await sandbox.execute("bash:run", {"command": "sleep 1.5; echo done"}, progress=progress)
        assert result["data"]["stdout"] == "done\n"
        # the same sandbox, no callback: a plain answer, nothing reported
        assert (await sandbox.execute("bash:run", {"command": "echo quiet"}))["data"]["stdout"] == "quiet\n"
    assert len(reports) >= 2
    assert all(message and "running for" in message for _, _, message in reports)
    assert [done for done, _, _ in reports] == sorted(done for done, _, _ in reports)


@pytest.mark.slow
async def test_a_call_longer_than_the_servers_keepalive_window(server: ServerProcess) -> None:
    """Past 15 s without a word the server may switch to an event stream and ping: the answer still arrives."""
    async with Sandbox(url=server.mcp_url, token=server.token) as sandbox:
        await sandbox.create_session("bash")
        result = await sandbox.execute("bash:run", {"command": "sleep 16; echo late"})
        assert result["data"]["stdout"] == "late\n"


@pytest.mark.parametrize("with_progress", [False, True])
async def test_large_answers_arrive_whole(server: ServerProcess, with_progress: bool) -> None:
    """Half a megabyte of output (twice in the answer: text and structured content), as JSON or as an event."""

    reports: list[float] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        reports.append(done)

    async with Sandbox(url=server.mcp_url, token=server.token) as sandbox:
        await sandbox.create_session("bash", {"max_output_bytes": 512 * 1024, "progress_interval": 0.2})
        # with progress: reports first, so the answer is the last event of an event stream
        command = ("sleep 0.7; " if with_progress else "") + "head -c 500000 /dev/zero | tr '\\0' a"
        result = await sandbox.execute("bash:run", {"command": command}, progress=progress if with_progress else None)
        assert result["data"]["stdout"] == "a" * 500000
    assert bool(reports) is with_progress


async def test_fifty_sandboxes_share_a_few_connections(server: ServerProcess) -> None:
    async with contextlib.AsyncExitStack() as stack:
        sandboxes: list[Sandbox] = []

        async def open_one() -> None:
            sandboxes.append(await stack.enter_async_context(Sandbox(url=server.mcp_url, token=server.token)))

        async with anyio.create_task_group() as tg:  # started concurrently: one discover serves them all
            for _ in range(50):
                tg.start_soon(open_one)
        for sandbox in sandboxes:  # one call at a time: every call can reuse the same connection
            result = await sandbox.execute("bash:run", {"command": "echo $((6*7))"})
            assert result["data"]["stdout"] == "42\n"
        assert _client_connections(server.port) <= 3

        async def call(sandbox: Sandbox) -> None:
            assert (await sandbox.execute("list_sessions", {}))["code"] == 0

        async with anyio.create_task_group() as tg:  # all at once: at most one connection per call in flight
            for sandbox in sandboxes:
                tg.start_soon(call, sandbox)
        assert _client_connections(server.port) <= 50
    await eventually(lambda: _client_connections(server.port) == 0, what="the pool closed with its last Sandbox")


async def test_a_connection_the_server_closed_while_idle_is_not_reused(tmp_path: Path) -> None:
    with running_http_server(tmp_path, server_settings={"keep_alive_timeout": 1.0}) as short:
        async with Sandbox(url=short.mcp_url, token=short.token) as sandbox:
            await sandbox.create_session("bash")
            assert (await sandbox.execute("bash:run", {"command": "echo one"}))["data"]["stdout"] == "one\n"
            # Waited for without yielding to the event loop, so the server's FIN is still unread when the
            # next call borrows a connection: the race a keep-alive expiry opens, made certain.
            eventually_sync(lambda: _client_connections(short.port) == 0, what="the server to close idle connections")
            assert (await sandbox.execute("bash:run", {"command": "echo two"}))["data"]["stdout"] == "two\n"


def _sleepers(marker: str) -> list[int]:
    return [pid for pid in session_pids(tag_prefix="bash-") if procs.command_line(pid).startswith(f"sleep {marker}")]



@pytest.mark.parametrize("how", ["timeout", "task-cancelled"])
async def test_a_cancelled_call_stops_its_command_on_the_server(
    server: ServerProcess, tmp_path: Path, how: str
) -> None:
    marker = tmp_path / "finished"
    duration = "3.21" if how == "timeout" else "3.22"  # tells this test's sleep from any other
    command = f"sleep {duration}; touch {marker}"
    async with Sandbox(url=server.mcp_url, token=server.token) as sandbox:
        await sandbox.create_session("bash")
        if how == "timeout":
            with pytest.raises(TimeoutError):
                with anyio.fail_after(1.0):
                    await sandbox.execute("bash:run", {"command": command})
        else:
            async with anyio.create_task_group() as tg:
                tg.start_soon(sandbox.execute, "bash:run", {"command": command})
                await eventually(lambda: _sleepers(duration), what="the command to start")
                tg.cancel_scope.cancel()
        await eventually(lambda: not _sleepers(duration), 10, what="the interrupted sleep to be gone")
        after = await sandbox.execute("bash:run", {"command": "echo still-usable"})
        assert after["data"]["stdout"] == "still-usable\n"
        assert not marker.exists()  # the shell answered the next command: the cancelled list is abandoned


# -- a server that does not speak 2026-07-28 ------------------------------------------------------


class _HandshakeEraOnly:
    """Hides the 2026-07-28 `MCP-Protocol-Version` header, so the SDK serves the request as the
    handshake era does (a session-less POST is refused): a server from before that revision."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.modern_posts = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            kept = [(k, v) for k, v in headers if not (k == b"mcp-protocol-version" and v == b"2026-07-28")]
            if len(kept) != len(headers):
                self.modern_posts += 1
                scope = {**scope, "headers": kept}
        await self.app(scope, receive, send)


@contextlib.asynccontextmanager
async def _serve_in_process(app: ASGIApp) -> AsyncIterator[str]:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning")
    uv = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(uv.serve)
        await eventually(lambda: uv.started, what="the in-process server to start")
        try:
            yield f"http://127.0.0.1:{port}/mcp"
        finally:
            uv.should_exit = True


async def test_a_server_without_the_revision_is_served_by_the_sdk_client(bash_manifest: Path) -> None:
    async with engine_from_manifest(load_manifest(bash_manifest)) as engine:
        old = _HandshakeEraOnly(authenticated_app(http_app(engine, build_server(engine)), None))
        async with _serve_in_process(old) as url:
            async with Sandbox(url=url, token=None) as sandbox:
                assert sandbox._light is None
                assert sandbox._client is not None
                assert sandbox._client.protocol_version != PROTOCOL_VERSION
                await sandbox.create_session("bash")
                assert (await sandbox.execute("bash:run", {"command": "echo old"}))["data"]["stdout"] == "old\n"
                assert (await sandbox.get_tools())[0]["name"]
            assert old.modern_posts >= 1  # the light path asked first


# -- broken servers ------------------------------------------------------------------------------

_DISCOVER = (
    b'{"jsonrpc":"2.0","id":%d,"result":{"supportedVersions":["2026-07-28"],"capabilities":{},'
    b'"resultType":"complete","ttlMs":0,"cacheScope":"public"}}'
)

_TOOL_RESULT = (
    b'{"jsonrpc":"2.0","id":%d,"result":{"content":[],"resultType":"complete",'
    b'"structuredContent":{"code":0,"message":"success","data":{}}}}'
)

Answer = Callable[[int], bytes]


def _http(status: str, content_type: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


def _json(body: bytes) -> bytes:
    return _http("200 OK", "application/json", body)


@contextlib.asynccontextmanager
async def _scripted_server(
    answer: Answer, *, on_request: Callable[[int, bytes, bytes], bytes | None] | None = None
) -> AsyncIterator[tuple[str, list[str]]]:
    """Answers `server/discover` and meta-tools properly and every `bash_run` with `answer(request_id)`.

    `on_request(request_id, head, body)`, if given, may answer any other request first.
    Yields the URL and a log of what happened to each connection ("closed by client", ...).
    """
    events: list[str] = []

    async def handle(stream: anyio.abc.SocketStream) -> None:
        buffer = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        chunk = await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        events.append("closed by client")
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.lower().split(b"\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in lines if line.startswith(b"content-length"))
                while len(buffer) < length:
                    buffer += await stream.receive()
                body, buffer = buffer[:length], buffer[length:]
                request_id = int(body.split(b'"id":', 1)[1].split(b",", 1)[0])
                if b'"server/discover"' in body:
                    await stream.send(_json(_DISCOVER % request_id))
                    continue
                reply = on_request(request_id, head, body) if on_request is not None else None
                if reply is None:
                    reply = answer(request_id) if b'"bash_run"' in body else _json(_TOOL_RESULT % request_id)
                if not reply:  # hold the call until the client gives up on it
                    events.append("request held")
                    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                        await stream.receive()
                    events.append("closed by client")
                    return
                await stream.send(reply)
                if b"connection: close" in reply:
                    return

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield f"http://127.0.0.1:{port}/mcp", events
        finally:
            tg.cancel_scope.cancel()


BROKEN: dict[str, tuple[Answer, str]] = {
    "HTTP 500, plain text": (lambda i: _http("500 Internal Server Error", "text/plain", b"boom"), "HTTP 500"),
    "HTTP 503, the server's busy answer": (
        lambda i: _http("503 Service Unavailable", "application/json", b'{"message": "too many open connections"}'),
        "HTTP 503: too many open connections",
    ),
    "HTTP 400, not JSON-RPC": (lambda i: _http("400 Bad Request", "text/plain", b"no"), "error response (HTTP 400)"),
    "HTTP 200, not JSON": (lambda i: _json(b"<html>surprise</html>"), "not JSON"),
    "JSON, not an object": (lambda i: _json(b"[1, 2]"), "not a JSON-RPC message"),
    "JSON-RPC answer to another id": (
        lambda i: _json(b'{"jsonrpc":"2.0","id":%d,"result":{}}' % (i + 1000)),
        "malformed answer",
    ),
    "JSON-RPC error": (
        lambda i: _json(b'{"jsonrpc":"2.0","id":%d,"error":{"code":-32603,"message":"kaputt"}}' % i),
        "kaputt",
    ),
    "no content type": (lambda i: _http("200 OK", "application/octet-stream", b"{}"), "Unexpected content type"),
    "event stream that ends without an answer": (
        lambda i: _http("200 OK", "text/event-stream", b": ping\r\n\r\n", b"connection: close\r\n"),
        "ended without an answer",
    ),
    "connection closed mid-answer": (
        lambda i: (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\nconnection: close\r\n\r\n{"
        ),
        "not retried",
    ),
    "a result asking for input": (
        lambda i: _json(b'{"jsonrpc":"2.0","id":%d,"result":{"resultType":"input_required","inputRequests":{}}}' % i),
        "resultType 'input_required'",
    ),
    "a result that is not a tool result": (
        lambda i: _json(b'{"jsonrpc":"2.0","id":%d,"result":{"content":"text"}}' % i),
        "malformed tool result",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
async def test_broken_answers_are_clear_errors_never_hangs(case: str) -> None:
    answer, words = BROKEN[case]
    async with _scripted_server(answer) as (url, _):
        with anyio.fail_after(20):
            async with Sandbox(url=url, token=None) as sandbox:
                assert sandbox._light is not None
                with pytest.raises(ServiceUnavailable) as caught:
                    await sandbox.execute("bash:run", {"command": "echo hi"})
    assert caught.value.code == 5002
    assert words in str(caught.value)


async def test_an_unreachable_server_is_a_clear_error() -> None:
    with socket.socket() as reserved:  # bound, never listening: connections are refused
        reserved.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{reserved.getsockname()[1]}/mcp"
        with pytest.raises(ServiceUnavailable) as caught:
            await Sandbox(url=url, token=None).start()
    assert "cannot reach" in str(caught.value)


async def test_cancelling_a_call_closes_its_connection() -> None:
    """A call abandoned by its caller is not left on a pooled connection: the server sees it closed."""
    async with _scripted_server(lambda i: b"") as (url, events):
        async with Sandbox(url=url, token=None) as sandbox:
            with anyio.move_on_after(0.5):
                await sandbox.execute("bash:run", {"command": "sleep 100"})
            await eventually(lambda: "request held" in events)
        await eventually(lambda: "closed by client" in events, what="the abandoned connection to close")


async def test_a_progress_callback_that_raises_does_not_fail_the_call(server: ServerProcess) -> None:
    async def progress(done: float, total: float | None, message: str | None) -> None:
        raise RuntimeError("callback bug")

    async with Sandbox(url=server.mcp_url, token=server.token) as sandbox:
        await sandbox.create_session("bash", {"progress_interval": 0.2})
        result = await sandbox.execute("bash:run", {"command": "sleep 0.6; echo fine"}, progress=progress)
        assert result["data"]["stdout"] == "fine\n"


@pytest.mark.parametrize(
    "result",
    [
        t.CallToolResult(content=[], structured_content={"code": 0, "message": "success", "data": {"x": 1}}),
        t.CallToolResult(content=[t.TextContent(type="text", text="plain"), t.TextContent(type="text", text="words")]),
        t.CallToolResult(content=[t.TextContent(type="text", text="failed")], is_error=True),
        t.CallToolResult(
            content=[
                t.ImageContent(type="image", data="aGk=", mime_type="image/png"),
                t.ImageContent(type="image", data="aG8=", mime_type="image/png"),
            ],
            structured_content={"code": 0, "message": "success", "data": {}},
        ),
    ],
)
def test_the_wire_envelope_is_the_sdk_paths_envelope(result: t.CallToolResult) -> None:
    wire = result.model_dump(by_alias=True, mode="json", exclude_none=True)
    assert _envelope_of_wire("tool", wire) == _envelope_of("tool", result)


async def test_a_header_mismatch_is_recovered_by_listing_tools_and_sending_once_more() -> None:
    """The 2026-07-28 recovery: a tool whose schema asks for `Mcp-Param-*` headers, called before it was
    listed, is refused (HEADER_MISMATCH, before it runs); the client lists the tools and sends it again."""
    schema = b'{"type":"object","properties":{"region":{"type":"string","x-mcp-header":"Region"}}}'
    calls: list[bytes] = []

    def on_request(request_id: int, head: bytes, body: bytes) -> bytes | None:
        if b'"tools/list"' in body:
            listing = b'{"tools":[{"name":"bash_run","inputSchema":%s}]}' % schema
            return _json(b'{"jsonrpc":"2.0","id":%d,"result":%s}' % (request_id, listing))
        if b'"bash_run"' not in body:
            return None
        calls.append(head.lower())
        if b"mcp-param-region: eu" in head.lower():
            return _json(_TOOL_RESULT % request_id)
        error = b'{"code":-32020,"message":"Mcp-Param-Region header is missing"}'
        return _http(
            "400 Bad Request", "application/json", b'{"jsonrpc":"2.0","id":%d,"error":%s}' % (request_id, error)
        )

    async with (
        _scripted_server(lambda i: b"", on_request=on_request) as (url, _),
        Sandbox(url=url, token=None) as sandbox,
    ):
        result = await sandbox.execute("bash:run", {"region": "eu"})
        assert result["code"] == 0
        assert len(calls) == 2  # refused once, then sent with the header
        await sandbox.execute("bash:run", {"region": "eu"})
        assert len(calls) == 3  # listed now: the header goes with the first send


async def test_a_call_carries_what_the_sdk_client_sends_at_this_revision() -> None:
    """Same MCP headers and `_meta` protocol fields as `mcp.Client` (2026-07-28, no callbacks) sends."""
    seen: list[tuple[dict[bytes, bytes], dict[str, Any]]] = []

    def on_request(request_id: int, head: bytes, body: bytes) -> bytes | None:
        if b'"tools/list"' in body:  # the SDK client lists to validate the result against the output schema
            listing = (
                b'{"tools":[{"name":"bash_run","inputSchema":{"type":"object"}}],'
                b'"ttlMs":0,"cacheScope":"private","resultType":"complete"}'
            )
            return _json(b'{"jsonrpc":"2.0","id":%d,"result":%s}' % (request_id, listing))
        if b'"tools/call"' in body:
            lines = head.split(b"\r\n")[1:]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
            seen.append((headers, json.loads(body)))
        return None

    async with _scripted_server(lambda i: _json(_TOOL_RESULT % i), on_request=on_request) as (url, _):
        async with Client(url) as official:
            meta = typing.cast(t.RequestParamsMeta, {"agentflow/worker_id": "w" * 22})
            await official.call_tool("bash_run", {"command": "echo hi"}, meta=meta)
        async with Sandbox(url=url, token=None, worker_id="w" * 22) as sandbox:
            await sandbox.execute("bash:run", {"command": "echo hi"})
    (sdk_headers, sdk_body), (light_headers, light_body) = seen[:2]  # (then the destroy_session of close)
    for header in (b"mcp-protocol-version", b"mcp-method", b"mcp-name", b"content-type", b"accept"):
        assert light_headers[header] == sdk_headers[header], header
    assert light_body["params"]["_meta"] == sdk_body["params"]["_meta"]
    assert light_body["params"]["arguments"] == sdk_body["params"]["arguments"]
    assert {k: v for k, v in light_body.items() if k != "id"} == {k: v for k, v in sdk_body.items() if k != "id"}


async def test_a_server_that_never_answers_the_probe_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(light_http, "DISCOVER_TIMEOUT", 0.5)  # the SDK's 10 s, shortened for the test

    async def swallow(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    await stream.receive()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, swallow)
        with pytest.raises(ServiceUnavailable) as caught:
            await Sandbox(url=f"http://127.0.0.1:{port}/mcp", token=None).start()
        tg.cancel_scope.cancel()
    assert "did not answer server/discover" in str(caught.value)


def test_the_stale_connection_check_still_hooks_aiohttps_pool_lookup() -> None:
    """`_CheckedConnector` overrides aiohttp's private `TCPConnector._get`: fail loudly if aiohttp changes it."""
    lookup = aiohttp.TCPConnector._get
    assert inspect.iscoroutinefunction(lookup)
    assert list(inspect.signature(lookup).parameters) == ["self", "key", "traces"]


@pytest.mark.parametrize("pages", ["two pages", "a cursor cycle"])
async def test_get_tools_follows_next_cursor(pages: str) -> None:
    def on_request(request_id: int, head: bytes, body: bytes) -> bytes | None:
        if b'"tools/list"' not in body:
            return None
        second = b'"cursor":"p2"' in body
        name = b"second" if second else b"first"
        more = b',"nextCursor":"p2"' if not second or pages == "a cursor cycle" else b""
        page = b'{"tools":[{"name":"%s","inputSchema":{"type":"object"}}]%s}' % (name, more)
        return _json(b'{"jsonrpc":"2.0","id":%d,"result":%s}' % (request_id, page))

    async with (
        _scripted_server(lambda i: b"", on_request=on_request) as (url, _),
        Sandbox(url=url, token=None) as sandbox,
    ):
        if pages == "two pages":
            assert [tool["name"] for tool in await sandbox.get_tools()] == ["first", "second"]
        else:
            with pytest.raises(ServiceUnavailable, match="pagination does not end"):
                await sandbox.get_tools()


async def test_the_environments_proxy_is_used_unless_no_proxy_exempts_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP_PROXY / NO_PROXY as the official client's httpx2 honours them (here the "proxy" answers itself)."""
    targets: list[bytes] = []

    def on_request(request_id: int, head: bytes, body: bytes) -> bytes | None:
        targets.append(head.split(b" ")[1])
        return None

    with socket.socket() as reserved:  # the server's address: bound, never listening, so only the proxy answers
        reserved.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{reserved.getsockname()[1]}/mcp"
        async with _scripted_server(lambda i: _json(_TOOL_RESULT % i), on_request=on_request) as (proxy_url, _):
            monkeypatch.setenv("HTTP_PROXY", proxy_url.removesuffix("/mcp"))
            monkeypatch.delenv("NO_PROXY", raising=False)
            monkeypatch.delenv("no_proxy", raising=False)
            async with Sandbox(url=url, token=None) as sandbox:
                assert (await sandbox.execute("bash:run", {"command": "echo hi"}))["code"] == 0
            assert targets
            assert all(target == url.encode() for target in targets)  # absolute-form: a request to a proxy
            monkeypatch.setenv("NO_PROXY", "127.0.0.1")
            with pytest.raises(ServiceUnavailable, match="cannot reach"):
                await Sandbox(url=url, token=None).start()
