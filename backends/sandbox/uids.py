"""Unique unprivileged uids for live sessions, so no two sessions (and never the server) share one.

Threat: sessions that share a uid can signal, ptrace and read each other's files and /proc
entries whenever some namespace is shared (`network = host`, a bind both see). Each live
session therefore gets its own uid from a reserved range (`UID_BASE` ..). A uid is taken by
holding an exclusive `flock` on `<lock dir>/<uid>` (so several servers on one host never
collide, and a crashed server's locks vanish with it) and only if no process on the host runs
under it (a dead server's leftovers, until they are swept).

Cost: finding out which uids run processes is a scan of /proc (about a millisecond, more on a
busy host), so it is done once per batch of `BATCH` uids, not per session. A uid whose
session ended with every process of it gone (its cgroup was empty) stays locked by this server
and goes to a spare list: taking it again needs no scan and no lock file, and no other server
can take it meanwhile. Nothing here blocks: locks are tried without waiting, so concurrent
session starts never queue behind one another.
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
#: uids locked per /proc scan (the spares wait, locked, for the next sessions).
BATCH = 8
#: Spare uids kept locked beyond that; more are given back to other servers.
MAX_SPARE = 64

_lock = threading.Lock()
_next: int | None = None
_spare: list[UidLease] = []


def _uids_in_use() -> set[int]:
    """Every uid of the reserved range that some process on the host runs under (one /proc scan)."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                uid = os.stat(f"/proc/{entry}").st_uid
                if UID_BASE <= uid < UID_BASE + UID_COUNT:
                    found.add(uid)
    return found


class UidLease:
    """One uid held for one session; `release` gives it back (idempotent)."""

    def __init__(self, uid: int, fd: int) -> None:
        self.uid = uid
        self._fd: int | None = fd

    def release(self, *, clean: bool = False) -> None:
        """Give the uid back. `clean`: no process runs under it any more (its session's cgroup
        was empty), so this server keeps it locked as a spare for its next session."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if clean:
            with _lock:
                if len(_spare) < MAX_SPARE:
                    _spare.append(UidLease(self.uid, fd))
                    return
        # The lock file stays: unlinking it would let two servers lock different inodes of one name.
        os.close(fd)


def _next_start(count: int) -> int:
    """Reserve `count` positions of the range to try (threads scanning at once try different uids)."""
    global _next
    with _lock:
        start = _next if _next is not None else (os.getpid() * 7919) % UID_COUNT
        _next = (start + count) % UID_COUNT
        return start


def _lock_batch(limit: int) -> list[UidLease]:
    LOCK_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    leases: list[UidLease] = []
    tried = 0
    while len(leases) < limit and tried < UID_COUNT:
        start = _next_start(limit * 4)
        for step in range(limit * 4):
            tried += 1
            uid = UID_BASE + (start + step) % UID_COUNT
            fd = os.open(LOCK_DIR / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            leases.append(UidLease(uid, fd))
            if len(leases) == limit:
                break
    if leases:
        # A lock nobody holds may still have processes under its uid (a dead server's,
        # until swept): one scan, now that the locks are held, drops those.
        busy = _uids_in_use()
        for lease in [lease for lease in leases if lease.uid in busy]:
            leases.remove(lease)
            lease.release()
    return leases


def spare_ready() -> bool:
    """Whether `allocate` would hand out a spare now, without locking a batch (a /proc scan)."""
    return bool(_spare)


def allocate() -> UidLease:
    """Lease a free uid from the reserved range. Raises OSError if none is free."""
    with _lock:
        if _spare:
            return _spare.pop()
    leases = _lock_batch(BATCH)
    if not leases:
        raise OSError("no free session uid in the reserved range")
    mine = leases.pop()
    with _lock:
        _spare.extend(leases)
    return mine
