"""Serving the MCP server over stdio, or over HTTP (streamable HTTP at /mcp, SSE at /sse)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import uvicorn
from mcp.server import Server
from mcp.server.sse import SseServerTransport
from mcp.server.stdio import stdio_server
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from session.engine import Engine

log = logging.getLogger(__name__)

MCP_PATH = "/mcp"
SSE_PATH = "/sse"
MESSAGES_PATH = "/messages/"
SHUTDOWN_GRACE = 30.0


async def serve_stdio(engine: Engine, server: Server[Any]) -> None:
    """One connection over stdin/stdout until EOF or SIGTERM/SIGINT; then every session dies."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(_exit_on_signal, engine)
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())
        tg.cancel_scope.cancel()


async def _exit_on_signal(engine: Engine) -> None:
    """Clean up, then exit: the SDK reads stdin in a thread that no cancellation reaches,
    so unwinding the transport would wait for the client to close its end."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %s: destroying all sessions and exiting", signal.Signals(signum).name)
            with anyio.move_on_after(SHUTDOWN_GRACE, shield=True):
                await engine.shutdown()
            logging.shutdown()
            os._exit(0)


class _UvicornServer(uvicorn.Server):
    """uvicorn, minus re-raising the signal after a graceful stop.

    uvicorn re-raises a captured SIGTERM once `serve()` returns, which would kill the
    process before the engine destroys its sessions; returning normally lets the
    caller's `async with engine` finish the cleanup.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def _security(host: str) -> TransportSecuritySettings | None:
    if host in ("127.0.0.1", "localhost", "::1"):
        return TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
            allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
        )
    return None


def http_app(engine: Engine, server: Server[Any], *, host: str = "127.0.0.1") -> Starlette:
    """Streamable HTTP (both protocol eras) at /mcp, legacy SSE at /sse, and GET /health.

    An MCP session idle for the session TTL is closed, which destroys its worker's
    sessions: a client that vanished without DELETE is reaped like an idle session.
    """
    security = _security(host)
    app = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        session_idle_timeout=engine.session_ttl,
        transport_security=security,
        host=host,
    )
    sse = SseServerTransport(MESSAGES_PATH, security_settings=security)

    async def handle_sse(request: Request) -> Response:
        async with sse.connect_sse(request.scope, request.receive, request._send) as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())
        return Response()

    async def health(request: Request) -> JSONResponse:
        status = engine.status()
        return JSONResponse({"status": status["status"], "live_sessions": status["live_sessions"]})

    app.router.routes.extend(
        [
            Route(SSE_PATH, endpoint=handle_sse, methods=["GET"]),
            Mount(MESSAGES_PATH, app=sse.handle_post_message),
            Route("/health", endpoint=health, methods=["GET"]),
        ]
    )
    return app


async def serve_http(engine: Engine, server: Server[Any], *, host: str, port: int, log_level: str) -> None:
    """Serve until SIGTERM/SIGINT (uvicorn handles both), then return so the engine can clean up."""
    config = uvicorn.Config(
        http_app(engine, server, host=host),
        host=host,
        port=port,
        log_level=log_level.lower(),
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    await _UvicornServer(config).serve()
