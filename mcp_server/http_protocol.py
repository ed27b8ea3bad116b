"""uvicorn's h11 protocol with a header-read deadline and an early refusal past the connection cap.

uvicorn (0.54) has an idle timeout between requests (`timeout_keep_alive`) but none for a
client that connects and sends nothing, or trickles a request's headers a byte at a
time (slowloris): each byte re-arms nothing and the connection is held forever. Here a
request's headers must be complete within `header_timeout` seconds of the connection
opening or of the previous response ending. The deadline applies only while the server
waits for headers, so a running tool call and an open SSE / listen stream are never cut.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

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


def guarded_protocol(header_timeout: float, hard_connection_limit: int) -> type[H11Protocol]:
    """An `H11Protocol` class (for `uvicorn.Config(http=...)`) with the header deadline.

    The connection cap proper is uvicorn's `limit_concurrency`, which reads a request and
    answers 503; past `hard_connection_limit` a connection is refused before reading
    anything, so a flood of connections that never send a request costs one write each.
    """

    class GuardedH11Protocol(H11Protocol):
        def __init__(
            self, config: Config, server_state: ServerState, app_state: dict[str, Any], _loop: Any = None
        ) -> None:
            super().__init__(config, server_state, app_state, _loop)
            self._header_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > hard_connection_limit:
                _refusals.log(
                    logging.WARNING,
                    "refused a connection from %s: %d connections are open already",
                    self.client[0] if self.client else "unknown",
                    hard_connection_limit,
                )
                transport.write(_BUSY)
                transport.close()
                return
            self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_deadline()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self._request_running():
                # Headers incomplete (or not begun after a keep-alive gap): the clock runs from now
                # if it is not running already, so trickling bytes does not extend it.
                self._arm_header_deadline()
            else:
                self._disarm_header_deadline()

        def _request_running(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm_header_deadline(self) -> None:
            if self._header_deadline is None:
                self._header_deadline = self.loop.call_later(header_timeout, self._header_deadline_passed)

        def _disarm_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _header_deadline_passed(self) -> None:
            self._header_deadline = None
            if self.transport.is_closing() or self._request_running() or self.conn.their_state is not h11.IDLE:
                return
            _refusals.log(
                logging.INFO,
                "closed a connection from %s: no complete request headers within %gs",
                self.client[0] if self.client else "unknown",
                header_timeout,
            )
            self.transport.close()

    return GuardedH11Protocol
