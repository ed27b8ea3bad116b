"""Display numbers: the server picks them, never twice for live desktops, never one the host uses."""

from __future__ import annotations

import os
import socket

import pytest

from backends.vm.allocator import DisplayAllocator
from session.errors import ResourceUnavailable


def _free_base(count: int) -> int:
    """A range of display numbers the host does not use right now (other tests may start X servers)."""
    probe = DisplayAllocator(20_000, 5_000)
    numbers = [probe.take() for _ in range(count)]
    assert numbers == list(range(numbers[0], numbers[0] + count)), "no contiguous free range"
    return numbers[0]


def test_live_numbers_are_never_handed_out_twice_and_come_back_when_released() -> None:
    base = _free_base(3)
    allocator = DisplayAllocator(base, 3)
    taken = [allocator.take() for _ in range(3)]
    assert taken == [base, base + 1, base + 2]
    with pytest.raises(ResourceUnavailable, match="no free display number"):
        allocator.take()
    allocator.release(base + 1)
    assert allocator.take() == base + 1
    assert allocator.live == frozenset(taken)


def test_numbers_to_avoid_and_host_used_numbers_are_skipped() -> None:
    base = _free_base(2)
    allocator = DisplayAllocator(base, 2)
    assert allocator.take(frozenset({base})) == base + 1
    # A number some other X server holds on this host (its lock file in /tmp) is skipped.
    lock = f"/tmp/.X{base}-lock"
    with open(lock, "x") as handle:
        handle.write("1\n")
    try:
        with pytest.raises(ResourceUnavailable):
            allocator.take()
    finally:
        os.unlink(lock)
    assert allocator.take() == base


def test_a_dead_x_servers_socket_does_not_hold_its_number() -> None:
    base = _free_base(1)
    allocator = DisplayAllocator(base, 1)
    path = f"/tmp/.X11-unix/X{base}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    try:
        listener.listen(1)
        with pytest.raises(ResourceUnavailable):
            allocator.take()  # a live X server (anything listening there) keeps it
        listener.close()
        assert allocator.take() == base  # the socket file is left, nobody answers: free
    finally:
        listener.close()
        os.unlink(path)
