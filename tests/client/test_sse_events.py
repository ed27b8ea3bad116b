"""The event-stream parser the light HTTP path reads SSE answers with (sandbox/sse_events.py)."""

from __future__ import annotations

import random

import pytest

from sandbox.sse_events import EventTooLarge, SseParser

STREAM = (
    b'event: message\r\ndata: {"a":1}\r\n\r\n'  # CRLF lines
    b": ping\r\n\r\n"  # a keepalive comment: no event
    b"data: x\ndata: y\n\n"  # LF lines, two data lines joined by a newline
    b"event: other\ndata: not ours\n\n"  # an event type that is not `message`: skipped
    b"id: 7\nretry: 100\n\n"  # no data: no event
    b"data:z\r\r"  # CR lines, no space after the colon
    b"data: " + b"q" * 5000 + b"\r\n\r\n"  # a long line
)
EXPECTED = [b'{"a":1}', b"x\ny", b"z", b"q" * 5000]


def _parse(parser: SseParser, chunks: list[bytes]) -> list[bytes]:
    return [event for chunk in chunks for event in parser.feed(chunk)]


def test_whole_stream() -> None:
    assert _parse(SseParser(10_000), [STREAM]) == EXPECTED


@pytest.mark.parametrize("seed", range(20))
def test_any_split_into_chunks_gives_the_same_events(seed: int) -> None:
    rng = random.Random(seed)
    chunks, at = [], 0
    while at < len(STREAM):
        size = rng.randint(1, 40)
        chunks.append(STREAM[at : at + size])
        at += size
    assert _parse(SseParser(10_000), chunks) == EXPECTED


def test_byte_by_byte_with_cr_lf_split_across_chunks() -> None:
    assert _parse(SseParser(10_000), [bytes([b]) for b in STREAM]) == EXPECTED


@pytest.mark.parametrize(
    "chunks",
    [
        [b"data: " + b"x" * 200],  # one unterminated line
        [b"data: " + b"x" * 60 + b"\n"] * 4,  # many data lines of one event
        [b"data: ", b"x" * 50, b"x" * 50, b"x" * 50],  # a long line arriving piecemeal
    ],
)
def test_an_event_over_the_cap_is_refused(chunks: list[bytes]) -> None:
    with pytest.raises(EventTooLarge):
        _parse(SseParser(100), chunks)
