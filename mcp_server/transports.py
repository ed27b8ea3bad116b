"""Serving the MCP server over stdio, or over HTTP (streamable HTTP at /mcp, SSE at /sse)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from mcp.server import Server
from mcp.server.sse import SseServerTransport
from mcp.server.stdio import stdio_server
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from mcp_server.auth import BearerAuth
from mcp_server.fast_calls import FastToolCalls
from mcp_server.http_protocol import guarded_protocol
from mcp_server.ratelimit import RateLimitFilter
from mcp_server.tokens import DEFAULT_PRINCIPAL, TokenSource, remove_token_file, write_token_file
from session.engine import Engine
from session.errors import ConfigurationError

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


def http_app(engine: Engine, server: Server[Any], *, host: str = "127.0.0.1") -> ASGIApp:
    """Streamable HTTP (both protocol eras) at /mcp, legacy SSE at /sse, and GET /health.

    An MCP session idle for the session TTL is closed, which destroys its worker's
    sessions: a client that vanished without DELETE is reaped like an idle session.
    Plain 2026-07-28 tool calls take the direct path of `mcp_server.fast_calls`.
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
        # Unauthenticated, so it says only that the server runs: no counts, names or versions.
        return JSONResponse({"status": "running"})

    app.router.routes.extend(
        [
            Route(SSE_PATH, endpoint=handle_sse, methods=["GET"]),
            Mount(MESSAGES_PATH, app=sse.handle_post_message),
            Route("/health", endpoint=health, methods=["GET"]),
        ]
    )
    return FastToolCalls(app, engine, server, security=security, path=MCP_PATH)


def http_backend_options() -> dict[str, Any]:
    """anyio backend options for serving HTTP: uvloop's event loop where it is installed (a declared
    dependency; a libuv loop spends less CPU per socket event and per child process than asyncio's)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover - only without the dependency
        return {}
    return {"use_uvloop": True}


@dataclass(frozen=True)
class HttpOptions:
    """Who may call (`tokens`, principal name -> token; None = no authentication) and the limits."""

    tokens: Mapping[str, str] | None
    token_source: TokenSource | None = None
    max_connections: int = 512
    header_timeout: float = 10.0
    keep_alive_timeout: float = 15.0

    def __repr__(self) -> str:  # never print the tokens
        principals = None if self.tokens is None else sorted(self.tokens)
        return f"HttpOptions(principals={principals}, max_connections={self.max_connections})"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def authenticated_app(app: ASGIApp, tokens: Mapping[str, str] | None) -> ASGIApp:
    """`app` behind bearer authentication (`tokens=None`: everyone is principal "default")."""
    return BearerAuth(app, tokens)


def _listen(host: str, port: int) -> socket.socket:
    """Bind before anything else, so a generated token file is written only by the server that owns the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off only on sockets whose proto says TCP, and
    # accepted sockets inherit it; with proto 0 every keep-alive response waited ~40 ms for
    # the client's delayed ACK. TCP_NODELAY on the listener is inherited too (belt and braces).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _quiet_floods() -> None:
    """At most a few lines per second of any one warning: refused connections must not flood the log."""
    flood_filter = RateLimitFilter()
    for name in ("", "uvicorn", "uvicorn.error"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RateLimitFilter) for f in handler.filters):
                handler.addFilter(flood_filter)


@dataclass
class HttpListener:
    """A bound socket, and the token file published for its port (if the token was generated).

    Opened before the engine starts, so a busy port or a refused `--no-auth` is a plain
    configuration error and a generated token file is written only by the server that
    owns the port.
    """

    sock: socket.socket
    host: str
    port: int
    options: HttpOptions
    token_path: Path | None

    @classmethod
    def open(cls, host: str, port: int, options: HttpOptions) -> HttpListener:
        """Bind `host:port` (0 = any free port) and publish a generated token.

        Raises:
            ConfigurationError: `--no-auth` on a non-loopback address, a busy port, an unwritable token file.
        """
        if options.tokens is None:
            if not is_loopback(host):
                raise ConfigurationError(
                    f"--no-auth is refused on {host}: without a token anyone who can reach that address may "
                    "call every tool; bind a loopback address (127.0.0.1, ::1, localhost) or configure tokens"
                )
            log.warning("--no-auth: HTTP and SSE accept every local caller without a token (principal 'default')")
        sock = _listen(host, port)
        bound = int(sock.getsockname()[1])
        try:
            token_path = _publish_token(options, bound)
        except ConfigurationError:
            sock.close()
            raise
        return cls(sock, host, bound, options, token_path)

    def close(self) -> None:
        self.sock.close()
        if self.token_path is not None and self.options.tokens is not None:
            remove_token_file(self.port, self.options.tokens[DEFAULT_PRINCIPAL])


async def serve_http(engine: Engine, server: Server[Any], *, listener: HttpListener, log_level: str) -> None:
    """Serve on `listener` until SIGTERM/SIGINT (uvicorn handles both), then return so the engine can clean up."""
    options = listener.options
    config = uvicorn.Config(
        authenticated_app(http_app(engine, server, host=listener.host), options.tokens),
        host=listener.host,
        port=listener.port,
        log_level=log_level.lower(),
        lifespan="on",
        # One line per request is a flood under attack; refusals have their own rate-limited line.
        access_log=log_level.upper() == "DEBUG",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=options.keep_alive_timeout,  # type: ignore[arg-type]  # any number works
        # uvicorn answers 503 once `len(connections) >= limit_concurrency`, counting the new one.
        limit_concurrency=options.max_connections + 1,
        http=guarded_protocol(options.header_timeout, hard_connection_limit=2 * options.max_connections),
    )
    _quiet_floods()
    await _UvicornServer(config).serve(sockets=[listener.sock])


def _publish_token(options: HttpOptions, port: int) -> Path | None:
    """Write a generated token to the port's token file and log its path (never the token)."""
    if options.tokens is None:
        return None
    if options.token_source is not TokenSource.GENERATED:
        log.info("bearer tokens from the %s: principals %s", options.token_source, ", ".join(sorted(options.tokens)))
        return None
    try:
        path = write_token_file(port, options.tokens[DEFAULT_PRINCIPAL])
    except OSError as exc:
        raise ConfigurationError(
            f"cannot write the generated token file ({exc.strerror}: {exc.filename}); set "
            "AGENTFLOW_SANDBOX_TOKEN or server.tokens instead"
        ) from None
    # WARNING so that it shows at every log level: clients need this path to connect.
    log.warning(
        "no token configured: generated one in %s (mode 0600); Sandbox(url) on this machine reads it, "
        "other clients send it as 'Authorization: Bearer <token>'",
        path,
    )
    return path
