"""Run a function in a thread of its own that ends right after it.

For work that changes the calling thread's namespaces (`unshare`, `setns` change only the
calling thread): a pooled worker thread must never be left in another namespace.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_own_thread(work: Callable[[], T], name: str) -> T:
    """`work()` in a fresh thread, joined: its result, or its exception raised here. Blocking."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
