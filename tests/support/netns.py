"""A private network namespace (only `lo`, up) for the calling thread: where a multi-node Ray runs here.

Why: two Ray nodes on one machine stay on loopback only inside a network namespace whose only
interface is `lo` (/work/shared/notes/machine.md, "Ray, Docker"): with eth0 present Ray rewrites
127.0.0.1 to the machine's address and the second node cannot reach the head. The test process
must talk to the front ends listening in there, so it must be in that namespace too.

How (the option chosen, and why it is reliable): on Linux the network namespace is a property of
each *thread*, not of the process. `PrivateNetwork` calls `unshare(CLONE_NEWNET)` on the calling
thread (pytest's main thread, which also runs the asyncio loop of async tests), brings `lo` up
with `ip link set lo up` from a child (children inherit the forking thread's namespace) and, on
exit, goes back with `setns(original, CLONE_NEWNET)`. In between:

- every socket the thread creates lives in the namespace (a socket keeps the namespace it was
  created in, so clients opened inside must be closed inside);
- every process the thread starts (`ray start`, front ends, query helpers) and every thread it
  starts inherits the namespace; the rest of the test run (other threads, later tests) never
  sees it;
- nothing has to be cleaned up afterwards: the namespace disappears with its last process and
  the last open descriptor (there is no holder process that could leak).

Rejected: running the whole pytest under `unshare --net` would change the network of every other
test (the browser tests' outbound policy, pasta) and cost a full-suite re-validation; a holder
process (`unshare --net sleep infinity` + `nsenter`) works too, but is one more process to leak.

Needs root (CAP_SYS_ADMIN) and `ip`; `available()` says why not otherwise. Threads created while
inside stay in the namespace for their whole life: `stray_threads()` lists them, so a fixture
can check no worker thread of the test run was left in a namespace that is about to vanish.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

CLONE_NEWNET = 0x40000000
_THREAD_NS = "/proc/thread-self/ns/net"

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def namespace_id(pid: int | None = None) -> str:
    """`net:[inode]` of the calling thread (or of process `pid`'s main thread); "" if gone/unreadable."""
    path = _THREAD_NS if pid is None else f"/proc/{pid}/ns/net"
    try:
        return os.readlink(path)
    except OSError:
        return ""


def available() -> str | None:
    """None when a private network namespace can be made here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "a private network namespace needs root (CAP_SYS_ADMIN)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is missing: it brings `lo` up in the private network namespace"
    return None


class PrivateNetwork:
    """Context manager: the calling thread enters a fresh network namespace with `lo` up; back on exit.

    Re-entrant by `enter()`/`leave()` pairs (a module-scoped fixture enters once; `inside()` lets a
    teardown running elsewhere step in again). Not thread-safe: use it from one thread.
    """

    def __init__(self) -> None:
        self._original: int | None = None
        self._mine: int | None = None
        self.id = ""

    def __enter__(self) -> PrivateNetwork:
        self.create()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def create(self) -> None:
        """Make the namespace and move the calling thread into it."""
        reason = available()
        if reason is not None:
            raise OSError(reason)
        self._original = os.open(_THREAD_NS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            self._mine = os.open(_THREAD_NS, os.O_RDONLY | os.O_CLOEXEC)
            self.id = namespace_id()
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True, timeout=30)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Move the calling thread back to its original namespace and drop our descriptors."""
        if self._original is not None:
            _check(_libc.setns(self._original, CLONE_NEWNET), "setns(original network namespace)")
            os.close(self._original)
            self._original = None
        if self._mine is not None:
            os.close(self._mine)
            self._mine = None

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """Run a block in the namespace from a thread that is outside it (then back)."""
        if self._mine is None:
            raise RuntimeError("the private network namespace is closed")
        if namespace_id() == self.id:
            yield
            return
        back = os.open(_THREAD_NS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc.setns(self._mine, CLONE_NEWNET), "setns(private network namespace)")
            try:
                yield
            finally:
                _check(_libc.setns(back, CLONE_NEWNET), "setns(back)")
        finally:
            os.close(back)

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        """Run a block back in the original namespace (the calling thread must be inside)."""
        if self._original is None or self._mine is None:
            raise RuntimeError("the private network namespace is closed")
        _check(_libc.setns(self._original, CLONE_NEWNET), "setns(original network namespace)")
        try:
            yield
        finally:
            _check(_libc.setns(self._mine, CLONE_NEWNET), "setns(private network namespace)")

    def processes(self) -> list[int]:
        """Live processes whose (main thread's) network namespace is this one."""
        if not self.id:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid() and namespace_id(int(entry.name)) == self.id:
                found.append(int(entry.name))
        return sorted(found)

    def stray_threads(self) -> list[int]:
        """Threads of this process, other than the caller, in this namespace (their sockets would be too)."""
        found = []
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            if int(task.name) == threading.get_native_id():
                continue
            try:
                if os.readlink(task / "ns" / "net") == self.id:
                    found.append(int(task.name))
            except OSError:
                continue  # the thread ended
        return found
