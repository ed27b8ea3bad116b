"""Unique unprivileged uids for live sessions, so no two sessions (and never the server) share one.

Threat: sessions that share a uid can signal, ptrace and read each other's files and /proc
entries whenever some namespace is shared (`network = host`, a bind both see). Each live
session therefore gets its own uid from a reserved range (`UID_BASE` ..). A uid is taken by
holding an exclusive `flock` on `<lock dir>/<uid>` for the session's lifetime (so several
servers on one host never collide, and a crashed server's locks vanish with it) and only if
no process on the host runs under it (a dead server's leftovers, until they are swept).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path

UID_BASE = 2_000_000
UID_COUNT = 60_000
LOCK_DIR = Path("/run/agentflow/uids")

_lock = threading.Lock()
_next = 0


def _uid_in_use(uid: int) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    return True
    return False


class UidLease:
    """One uid held for one session; `release` gives it back (idempotent)."""

    def __init__(self, uid: int, fd: int) -> None:
        self.uid = uid
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            # The lock file stays: unlinking it would let two servers lock different inodes of one name.
            os.close(fd)


def allocate() -> UidLease:
    """Lease a free uid from the reserved range. Raises OSError if none is free."""
    global _next
    LOCK_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _lock:
        start = _next if _next else (os.getpid() * 7919) % UID_COUNT
        for step in range(UID_COUNT):
            uid = UID_BASE + (start + step) % UID_COUNT
            fd = os.open(LOCK_DIR / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if _uid_in_use(uid):
                os.close(fd)
                continue
            _next = (start + step + 1) % UID_COUNT
            return UidLease(uid, fd)
    raise OSError("no free session uid in the reserved range")
