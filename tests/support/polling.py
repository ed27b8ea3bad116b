"""Waiting for a condition with a deadline.

The process table, a file another process writes and a reaper offer nothing to wait on,
so a bounded poll is the honest way to observe them; a fixed sleep is either too short
on a loaded machine or wastes time on an idle one.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

import anyio
import pytest

T = TypeVar("T")

#: Default deadline. Generous on purpose: on a busy shared 2-core machine a condition that
#: holds within milliseconds when idle can take seconds; a passing poll returns at once.
DEFAULT_WITHIN = 15.0


def _describe(what: str | Callable[[], str] | None) -> str:
    if what is None:
        return "condition"
    return what() if callable(what) else what


@overload
async def eventually(
    condition: Callable[[], Awaitable[T]],
    within: float = ...,
    every: float = ...,
    *,
    what: str | Callable[[], str] | None = ...,
) -> T: ...


@overload
async def eventually(
    condition: Callable[[], T],
    within: float = ...,
    every: float = ...,
    *,
    what: str | Callable[[], str] | None = ...,
) -> T: ...


async def eventually(
    condition: Callable[[], Any],
    within: float = DEFAULT_WITHIN,
    every: float = 0.05,
    *,
    what: str | Callable[[], str] | None = None,
) -> Any:
    """Poll `condition` until it returns something truthy and return that; fail the test after `within` s.

    `what` (a string, or a callable evaluated at failure time) names the condition in the failure.
    """
    deadline = anyio.current_time() + within
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if anyio.current_time() > deadline:
            pytest.fail(f"timed out after {within:g}s waiting for {_describe(what)}")
        await anyio.sleep(every)


def eventually_sync(
    condition: Callable[[], T],
    within: float = DEFAULT_WITHIN,
    every: float = 0.05,
    *,
    what: str | Callable[[], str] | None = None,
) -> T:
    """`eventually` for synchronous code (fixtures, subprocess helpers)."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:g}s waiting for {_describe(what)}")
        time.sleep(every)
