"""Both uvicorn parsers (httptools, the default, and h11) keep the header deadline, the early
refusal past the hard connection limit and keep-alive, with real sockets against an in-process
uvicorn; and on h11, which gives no disconnect signal, a client leaving mid-call still cancels it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from manifests import load_manifest
from mcp_server.app import build_server
from mcp_server.factory import engine_from_manifest
from mcp_server.http_protocol import Parser, guarded_protocol
from mcp_server.transports import _listen, authenticated_app, http_app
from tests.support import leaks, procs
from tests.support.leaks import session_pids
from tests.support.manifests import write_manifest
from tests.support.polling import eventually, eventually_sync
from tests.support.ports import trickle_headers

PARSERS: list[Parser] = ["httptools", "h11"]


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body = b'{"hello": "world"}'
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def serving(
    app: object, parser: Parser, *, header_timeout: float = 0.5, hard_limit: int = 50
) -> AsyncIterator[int]:
    """uvicorn with the guarded protocol of `parser` on a free port; yields the port."""
    sock = _listen("127.0.0.1", 0)
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        log_level="warning",
        lifespan="auto",
        timeout_keep_alive=30,
        http=guarded_protocol(header_timeout, hard_connection_limit=hard_limit, parser=parser),
    )
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        await eventually(lambda: server.started, 30, what="uvicorn to start")
        try:
            yield int(sock.getsockname()[1])
        finally:
            server.should_exit = True
    sock.close()


def get(sock: socket.socket, path: str = "/") -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    answer = b""
    while b'"world"}' not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    return answer


@pytest.mark.parametrize("parser", PARSERS)
async def test_keep_alive_requests_are_answered_whole(parser: Parser) -> None:
    async with serving(hello, parser) as port:

        def two_requests() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                return [get(sock), get(sock)]

        for answer in await anyio.to_thread.run_sync(two_requests):
            assert answer.startswith(b"HTTP/1.1 200"), answer
            assert answer.endswith(b'{"hello": "world"}'), answer


@pytest.mark.parametrize("parser", PARSERS)
async def test_trickled_headers_are_cut_at_the_deadline(parser: Parser) -> None:
    async with serving(hello, parser, header_timeout=0.5) as port:

        def slowloris() -> str:  # up to ~60 s of trickling, far past the 0.5 s deadline
            return trickle_headers(port, "/", every=0.1, rounds=600)

        def silent() -> str:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                return "closed" if sock.recv(1024) == b"" else "answered"

        assert await anyio.to_thread.run_sync(slowloris) == "closed"
        assert await anyio.to_thread.run_sync(silent) == "closed"


@pytest.mark.parametrize("parser", PARSERS)
async def test_connections_past_the_hard_limit_are_refused_before_reading(parser: Parser) -> None:
    async with serving(hello, parser, header_timeout=30, hard_limit=3) as port:
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        try:
            for sock in held:  # each is known to the server once it has answered on it
                assert (await anyio.to_thread.run_sync(get, sock)).startswith(b"HTTP/1.1 200")

            def refused() -> bytes:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    answer = b""
                    while chunk := sock.recv(4096):
                        answer += chunk
                    return answer

            answer = await anyio.to_thread.run_sync(refused)
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert b"too many open connections" in answer
            assert (await anyio.to_thread.run_sync(get, held[0])).startswith(b"HTTP/1.1 200")
        finally:
            for sock in held:
                sock.close()


@pytest.mark.slow
async def test_on_h11_a_disconnect_mid_call_still_cancels_the_command(tmp_path: Path) -> None:
    """h11 gives no disconnect signal: the fast path's fallback watches `receive()` instead."""
    marker = leaks.new_test_marker()
    manifest = load_manifest(write_manifest(tmp_path, session_ttl=30.0, test_marker=marker))
    token = uuid.uuid4().hex * 2
    sleep = f"sleep 3{uuid.uuid4().int % 10**6:06d}"
    worker = uuid.uuid4().hex
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "agentflow/worker_id": worker,
    }

    def request(port: int, name: str, arguments: dict[str, object]) -> bytes:
        body = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": name, "arguments": arguments, "_meta": meta},
            }
        ).encode()
        head = (
            f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
            "Accept: application/json, text/event-stream\r\nContent-Type: application/json\r\n"
            f"MCP-Protocol-Version: 2026-07-28\r\nMcp-Method: tools/call\r\nMcp-Name: {name}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    def sleepers() -> list[int]:
        return [pid for pid in session_pids(test_marker=marker) if procs.command_line(pid) == sleep]

    try:
        async with engine_from_manifest(manifest) as engine:
            app = authenticated_app(http_app(engine, build_server(engine)), {"default": token})
            async with serving(app, "h11", header_timeout=30) as port:

                def create() -> bytes:
                    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                        sock.sendall(request(port, "create_session", {"resource": "bash"}))
                        return read_response(sock)

                assert b'"isError":false' in await anyio.to_thread.run_sync(create)
                with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                    sock.sendall(request(port, "bash_run", {"command": sleep}))
                    await eventually(sleepers, 15, what="the sleep to start")
                await eventually(lambda: not sleepers(), 15, what="the sleep to be interrupted")
    finally:
        leaks.kill_leftovers(test_marker=marker)
    eventually_sync(lambda: not session_pids(test_marker=marker), 15, what="the session to end")


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length body."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(next(line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))[15:])
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body

