"""The bash backend's sentinel scanner and bounded capture, on byte streams cut every way."""

from __future__ import annotations

from backends.bash.capture import BoundedCapture, SentinelScanner

MARKER = "__AF_0123456789abcdef0123456789abcdef_"


def feed_in_chunks(data: bytes, size: int) -> tuple[int | None, bytes, bytes]:
    """(exit code, output before the sentinel, bytes kept after it) feeding `size`-byte chunks."""
    scanner = SentinelScanner(MARKER)
    capture = BoundedCapture(1 << 20)
    code = None
    for i in range(0, len(data), size):
        code = scanner.feed(data[i : i + size], capture)
        if code is not None:
            rest = data[i + size :]
            return code, bytes(capture.head + capture.tail), bytes(scanner.pending) + rest
    return code, bytes(capture.head + capture.tail), bytes(scanner.pending)


def test_a_sentinel_split_anywhere_is_found_with_the_output_before_and_after_it() -> None:
    stream = b"hello\nworld" + f"{MARKER}17__\n".encode() + b"late job output"
    for size in range(1, len(stream) + 1):
        assert feed_in_chunks(stream, size) == (17, b"hello\nworld", b"late job output"), size


def test_a_marker_without_a_well_formed_code_is_output() -> None:
    fake = f"{MARKER}x__\n{MARKER}12_\n".encode()
    stream = fake + f"{MARKER}0__\n".encode()
    for size in (1, 7, len(stream)):
        assert feed_in_chunks(stream, size) == (0, fake, b""), size


def test_no_sentinel_keeps_only_a_short_tail_pending_and_drain_flushes_it() -> None:
    scanner = SentinelScanner(MARKER)
    capture = BoundedCapture(1 << 20)
    assert scanner.feed(b"x" * 1000 + MARKER.encode()[:10], capture) is None
    assert len(scanner.pending) <= len(MARKER) + 16
    scanner.drain(capture)
    assert capture.total == 1010
    assert scanner.pending == b""
