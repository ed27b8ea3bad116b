"""An incremental `text/event-stream` parser (the WHATWG rules the MCP SSE responses follow).

Fed the response body in whatever chunks the socket delivers; yields each complete
`message` event's `data`. Comments (`: ping` keepalives), `id`, `retry` and events without data are
skipped: a 2026-07-28 response stream is never resumed, so ids have no use here.
"""

from __future__ import annotations

from collections.abc import Iterator


class EventTooLarge(ValueError):
    """One event (or one unterminated line) exceeded the size cap."""


class SseParser:
    """Splits a byte stream into events; `feed()` returns the `data` of each completed event."""

    def __init__(self, max_event_bytes: int) -> None:
        self._max = max_event_bytes
        self._pending: list[bytes] = []  # an incomplete trailing line, in the chunks it came in
        self._pending_size = 0
        self._data: list[bytes] = []
        self._type = b""
        self._size = 0
        self._skip_lf = False  # a chunk ended in CR: a LF opening the next chunk belongs to it

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        """Consume `chunk`; yield each event completed by it.

        Raises:
            EventTooLarge: an event or a line is longer than the cap.
        """
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = False
        if b"\n" not in chunk and b"\r" not in chunk:  # a long line arriving piecemeal: no copying
            self._hold(chunk)
            return
        buffer = b"".join([*self._pending, chunk]) if self._pending else chunk
        self._pending, self._pending_size = [], 0
        start = 0
        end = len(buffer)
        while start < end:
            cr = buffer.find(b"\r", start)
            lf = buffer.find(b"\n", start)
            if cr < 0 and lf < 0:
                break
            if cr < 0 or (0 <= lf < cr):
                line, start = buffer[start:lf], lf + 1
            elif cr + 1 < end:
                line, start = buffer[start:cr], cr + (2 if buffer[cr + 1 : cr + 2] == b"\n" else 1)
            else:  # a CR at the very end: the line is complete, its LF may come with the next chunk
                line, start = buffer[start:cr], cr + 1
                self._skip_lf = True
            event = self._line(line)
            if event is not None:
                yield event
        if start < end:
            self._hold(buffer[start:])

    def _hold(self, part: bytes) -> None:
        self._pending.append(part)
        self._pending_size += len(part)
        if self._pending_size + self._size > self._max:
            raise EventTooLarge(f"an event-stream event is larger than {self._max} bytes")

    def _line(self, line: bytes) -> bytes | None:
        if not line:
            parts, kind = self._data, self._type
            self._data, self._size, self._type = [], 0, b""
            return b"\n".join(parts) if parts and kind in (b"", b"message") else None
        if line[:1] == b":":
            return None
        field, _, value = line.partition(b":")
        if field == b"data":
            value = value[1:] if value[:1] == b" " else value
            self._size += len(value) + 1
            if self._size > self._max:
                raise EventTooLarge(f"an event-stream event is larger than {self._max} bytes")
            self._data.append(value)
        elif field == b"event":
            self._type = value[1:] if value[:1] == b" " else value
        return None
