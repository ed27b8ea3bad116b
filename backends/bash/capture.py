"""Bounded capture of a command's output stream, and sentinel detection in it."""

from __future__ import annotations

import re

#: What follows a sentinel's marker: the exit code and the end of the line.
_CODE = re.compile(rb"(\d+)__\n")
OMISSION = "\n... [{omitted} bytes omitted: output is capped at {cap} bytes per stream] ...\n"


class BoundedCapture:
    """Keeps the first and last part of a stream, never more than `cap` bytes in all.

    The head shows how a command started, the tail how it ended (errors usually sit
    at the end), and memory stays bounded however much a command prints.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.head_cap = cap // 2
        self.tail_cap = cap - self.head_cap
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.tail_cap:
                del self.tail[: len(self.tail) - self.tail_cap]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head) + len(self.tail)

    def text(self) -> str:
        if not self.truncated:
            return (bytes(self.head) + bytes(self.tail)).decode("utf-8", "replace")
        omitted = self.total - len(self.head) - len(self.tail)
        return (
            self.head.decode("utf-8", "replace")
            + OMISSION.format(omitted=omitted, cap=self.cap)
            + self.tail.decode("utf-8", "replace")
        )


class SentinelScanner:
    """Finds `<marker><exit code>__\\n` in a byte stream that arrives in chunks.

    Bytes before the sentinel go to the capture as they arrive, except a short tail
    that might be the start of a split sentinel; bytes after it are kept for the next
    command (output of background jobs that raced the sentinel).
    """

    def __init__(self, marker: str) -> None:
        # A find plus one shared pattern, not a pattern per marker: markers are random per
        # shell, so compiling one would cost every session start ~0.1 ms (re's cache never hits).
        self.marker = marker.encode()
        self.hold = len(marker) + 16
        self.pending = bytearray()

    def _search(self) -> tuple[int, int, int] | None:
        """(start, end, exit code) of the first complete sentinel in `pending`."""
        position = 0
        while (start := self.pending.find(self.marker, position)) >= 0:
            match = _CODE.match(self.pending, start + len(self.marker))
            if match is not None:
                return start, match.end(), int(match.group(1))
            position = start + 1
        return None

    def feed(self, data: bytes, capture: BoundedCapture) -> int | None:
        """Add a chunk; return the exit code once the sentinel is seen."""
        self.pending += data
        found = self._search()
        if found is not None:
            start, end, code = found
            capture.add(bytes(self.pending[:start]))
            del self.pending[:end]
            return code
        flush = len(self.pending) - self.hold
        if flush > 0:
            capture.add(bytes(self.pending[:flush]))
            del self.pending[:flush]
        return None

    def drain(self, capture: BoundedCapture) -> None:
        """The stream ended without a sentinel: everything pending is output."""
        capture.add(bytes(self.pending))
        self.pending.clear()
