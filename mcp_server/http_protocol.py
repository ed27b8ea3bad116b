"""uvicorn's HTTP protocols with a header-read deadline and an early refusal past the connection cap.

uvicorn (0.54) has an idle timeout between requests (`timeout_keep_alive`) but none for a
client that connects and sends nothing, or trickles a request's headers a byte at a
time (slowloris): each byte re-arms nothing and the connection is held forever. Here a
request's headers must be complete within `header_timeout` seconds of the connection
opening or of the first byte after a keep-alive gap. The deadline applies only while the
server waits for headers, so a running tool call and an open SSE / listen stream are never cut.

Both of uvicorn's parsers get the same guard: httptools (C, the default: it costs a
fraction of h11's per-request CPU) and h11 (pure Python, where httptools is not installed).
The httptools protocol also sends a response's status line, headers and body as one write,
and gives each request a `DisconnectSignal` (`mcp_server.fast_calls` cancels a call with it).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Literal

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from mcp_server.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)
_refusals = RateLimitedLog(log)

_BUSY_BODY = b'{"error": "service_unavailable", "message": "too many open connections; retry later"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"retry-after: 1\r\ncontent-length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY
)

Parser = Literal["httptools", "h11"]

#: ASGI scope extension under which the protocol puts the request's `DisconnectSignal`.
DISCONNECT_EXTENSION = "agentflow.disconnect"


class DisconnectSignal:
    """Tells a request handler, by callback, that its client went away mid-request.

    uvicorn only answers a later `receive()` with `http.disconnect`, so learning of a
    disconnect while busy costs a task that waits on `receive()`, per request. The protocol
    fires this instead when the connection is lost before the response completed.
    """

    __slots__ = ("_callback", "fired")

    def __init__(self) -> None:
        self.fired = False
        self._callback: Callable[[], object] | None = None

    def watch(self, callback: Callable[[], object] | None) -> None:
        """Call `callback` on disconnect (at once if it happened already); None stops watching."""
        self._callback = callback
        if callback is not None and self.fired:
            callback()

    def fire(self) -> None:
        if not self.fired:
            self.fired = True
            if self._callback is not None:
                self._callback()


def default_parser() -> Parser:
    """httptools when it is installed (a declared dependency), else h11."""
    try:
        import httptools  # noqa: F401
    except ImportError:  # pragma: no cover - only without the dependency
        return "h11"
    return "httptools"


class _Guard:
    """The header deadline and the hard connection limit of one connection.

    Kept apart from the protocol classes so both parsers share one implementation; the
    protocol says whether it is waiting for headers (`waiting`) and the guard decides.
    """

    __slots__ = ("_deadline", "_header_timeout", "_protocol")

    def __init__(self, protocol: Any, header_timeout: float) -> None:
        self._protocol = protocol
        self._header_timeout = header_timeout
        self._deadline: asyncio.TimerHandle | None = None

    def admit(self, transport: asyncio.Transport, hard_connection_limit: int) -> bool:
        """Refuse the connection with a 503 before reading anything if too many are open."""
        if len(self._protocol.connections) > hard_connection_limit:
            client = self._protocol.client
            _refusals.log(
                logging.WARNING,
                "refused a connection from %s: %d connections are open already",
                client[0] if client else "unknown",
                hard_connection_limit,
            )
            transport.write(_BUSY)
            transport.close()
            return False
        self.arm()
        return True

    def update(self, waiting: bool) -> None:
        """After data arrived: run the clock while headers are incomplete (without restarting
        it, so trickling bytes does not extend it), stop it once they are complete."""
        if waiting:
            self.arm()
        else:
            self.disarm()

    def arm(self) -> None:
        if self._deadline is None:
            self._deadline = self._protocol.loop.call_later(self._header_timeout, self._passed)

    def disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _passed(self) -> None:
        self._deadline = None
        protocol = self._protocol
        if protocol.transport.is_closing() or not protocol.waiting_for_headers():
            return
        _refusals.log(
            logging.INFO,
            "closed a connection from %s: no complete request headers within %gs",
            protocol.client[0] if protocol.client else "unknown",
            self._header_timeout,
        )
        protocol.transport.close()


class _CoalescingTransport:
    """The connection's transport, with the writes of one event-loop turn sent as one.

    uvicorn writes a response's status line and headers at `http.response.start` and its
    body at `http.response.body`: two sends, two TCP segments and two wake-ups of the client
    for a response that is complete at once. Writes made in the same turn are joined and
    sent at the end of it (a streamed body's later chunks come in later turns and go out as
    they come); `close` sends what is pending first. Everything else is the transport's own.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._pending is None:
            self._pending = [bytes(data)]
            self._loop.call_soon(self._flush)
        else:
            self._pending.append(bytes(data))

    def writelines(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def guarded_protocol(
    header_timeout: float, hard_connection_limit: int, parser: Parser | None = None
) -> type[asyncio.Protocol]:
    """A uvicorn HTTP protocol class (for `uvicorn.Config(http=...)`) with the header deadline.

    The connection cap proper is uvicorn's `limit_concurrency`, which reads a request and
    answers 503; past `hard_connection_limit` a connection is refused before reading
    anything, so a flood of connections that never send a request costs one write each.
    """
    if (parser or default_parser()) == "h11":
        return _h11_protocol(header_timeout, hard_connection_limit)
    return _httptools_protocol(header_timeout, hard_connection_limit)


def _httptools_protocol(header_timeout: float, hard_connection_limit: int) -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(
            self, config: Config, server_state: ServerState, app_state: dict[str, Any], _loop: Any = None
        ) -> None:
            super().__init__(config, server_state, app_state, _loop)
            self._guard = _Guard(self, header_timeout)
            # From the first byte of a request until its headers are parsed (or before any byte).
            self._in_headers = True
            # The disconnect signals of the requests not yet answered, oldest first: responses
            # complete in request order, pipelined or not.
            self._unanswered: deque[DisconnectSignal] = deque()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if self._guard.admit(transport, hard_connection_limit):
                # Request cycles take `self.transport` when they start: theirs coalesces.
                self.transport = _CoalescingTransport(transport, self.loop)  # type: ignore[assignment]

        def connection_lost(self, exc: Exception | None) -> None:
            self._guard.disarm()
            while self._unanswered:
                self._unanswered.popleft().fire()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._guard.update(self.waiting_for_headers())

        def on_message_begin(self) -> None:
            self._in_headers = True
            super().on_message_begin()
            signal = DisconnectSignal()
            self._unanswered.append(signal)
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
            extensions[DISCONNECT_EXTENSION] = signal

        def on_response_complete(self) -> None:
            if self._unanswered:
                self._unanswered.popleft()
            super().on_response_complete()

        def on_headers_complete(self) -> None:
            self._in_headers = False
            super().on_headers_complete()

        def waiting_for_headers(self) -> bool:
            running = self.cycle is not None and not self.cycle.response_complete
            return self._in_headers and not running

    return GuardedHttpToolsProtocol


def _h11_protocol(header_timeout: float, hard_connection_limit: int) -> type[asyncio.Protocol]:
    class GuardedH11Protocol(H11Protocol):
        def __init__(
            self, config: Config, server_state: ServerState, app_state: dict[str, Any], _loop: Any = None
        ) -> None:
            super().__init__(config, server_state, app_state, _loop)
            self._guard = _Guard(self, header_timeout)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._guard.admit(transport, hard_connection_limit)

        def connection_lost(self, exc: Exception | None) -> None:
            self._guard.disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._guard.update(self.waiting_for_headers())

        def waiting_for_headers(self) -> bool:
            running = self.cycle is not None and not self.cycle.response_complete
            return self.conn.their_state is h11.IDLE and not running

    return GuardedH11Protocol
