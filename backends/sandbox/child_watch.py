"""Child-process reaping without a thread per child, for sessions spawned on asyncio (Python 3.11).

Python 3.11's asyncio learns of a child's exit through `ThreadedChildWatcher`: one thread per
child, blocked in `waitpid`, and `Thread.start` blocks the event loop until that new thread
has run. On a busy 2-core host that wait took several milliseconds per spawn (measured with
bench/bench_starts.py and a probe of call latency while the warm pool refilled): every
session start stalled every call in flight. `PidfdChildWatcher` watches a pidfd on the loop
itself (no thread, no wait). Python 3.12+ does that by itself, and uvloop reaps children its
own way, so this only acts on 3.11's default asyncio loop. 3.11's own `PidfdChildWatcher` is
bound to one loop (a process running loops one after another, as tests do, would break), so
this is 3.12's loop-agnostic version: each child is watched on the loop that spawned it.

Children already registered with the threaded watcher keep their threads; only new spawns
use the pidfd watcher.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_checked = False


class LoopPidfdWatcher(asyncio.AbstractChildWatcher):
    """Watches each child through a pidfd on the running loop (Python 3.12's PidfdChildWatcher)."""

    def __init__(self) -> None:
        self._watched: dict[int, tuple[asyncio.AbstractEventLoop, int]] = {}

    def __enter__(self) -> LoopPidfdWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def is_active(self) -> bool:
        return True

    def close(self) -> None:
        return None

    def attach_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        return None

    def add_child_handler(self, pid: int, callback: Callable[..., object], *args: Any) -> None:  # type: ignore[override]
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(pid)
        self._watched[pid] = (loop, pidfd)
        loop._add_reader(pidfd, self._do_wait, pid, pidfd, callback, args)  # type: ignore[attr-defined]

    def _do_wait(self, pid: int, pidfd: int, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self._watched.pop(pid, None)
        loop = asyncio.get_running_loop()
        loop._remove_reader(pidfd)  # type: ignore[attr-defined]
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            # Reaped elsewhere (a waitpid outside asyncio): as asyncio itself reports it.
            returncode = 255
            log.warning("child process %d exit status already read: will report returncode 255", pid)
        else:
            returncode = os.waitstatus_to_exitcode(status)
        os.close(pidfd)
        callback(pid, returncode, *args)

    def remove_child_handler(self, pid: int) -> bool:
        watched = self._watched.pop(pid, None)
        if watched is None:
            return False
        loop, pidfd = watched
        loop._remove_reader(pidfd)  # type: ignore[attr-defined]
        os.close(pidfd)
        return True


def use_pidfd_watcher() -> None:
    """Switch asyncio (3.11) to the pidfd child watcher, once per process; a no-op elsewhere."""
    global _checked
    if _checked:
        return
    _checked = True
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        _checked = False  # not on an asyncio loop (trio, or none yet): look again on the next spawn
        return
    if not isinstance(loop, asyncio.base_events.BaseEventLoop) or type(loop).__module__.startswith("uvloop"):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        policy = asyncio.get_event_loop_policy()
        try:
            current = policy.get_child_watcher()
        except NotImplementedError:
            return
        if not isinstance(current, asyncio.ThreadedChildWatcher):
            return  # someone chose a watcher on purpose: keep it
        try:
            os.close(os.pidfd_open(os.getpid()))
        except OSError as exc:
            log.debug("pidfd_open unavailable (%s): keeping the threaded child watcher", exc)
            return
        policy.set_child_watcher(LoopPidfdWatcher())
