"""A session's own mount namespace: where its home, /tmp and staged binds are mounted.

Why not on the host: every new mount namespace (each bwrap start) copies every mount of the
namespace it is made from, under the kernel's global namespace lock, and drops the copies again
at its pivot_root. Mounted on the host, each live session's tmpfs mounts made every later start
slower for everyone (measured here: 400 host mounts, i.e. 200 live sessions, took a bare bwrap
start from 5.0 to 7.2 ms and 50 concurrent starts from 130 to 280 ms) and filled the host's mount
table, which tools like systemd re-read on every change. In a namespace of its own, a session's
mounts cost no other start anything, and they vanish with the namespace's last descriptor: a
server that dies leaves no mount behind.

How: a short-lived thread unshares its mount namespace (a copy of the server's, made private so
nothing propagates back to the host), mounts there and opens descriptors of the namespace and
of each mount's root; then it exits. Those descriptors keep it all alive until `close`:
- every spawn of the session enters the namespace first (`agentflow-launch --mntns-fd`), so
  bwrap and runsc resolve the stage paths to these mounts, and only these;
- the server reaches a mount through `/proc/self/fd/N` (and any root process on the host
  through `/proc/<server pid>/fd/N`); bwrap binds from such a descriptor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from backends.sandbox.own_thread import in_own_thread

CLONE_NEWNS = 0x00020000
MS_NOSUID = 2
MS_NODEV = 4
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount(source: str | None, target: Path, fstype: str | None, flags: int, data: str | None) -> None:
    """mount(2). Raises OSError naming the mount."""
    rc = _libc.mount(
        source.encode() if source is not None else None,
        os.fsencode(target),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def unmount(target: Path) -> None:
    """Lazily unmount `target` (a busy mount goes once its last user does). Never raises."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
            log.warning("umount %s: %s", target, os.strerror(err))


@dataclass(frozen=True)
class MountRequest:
    """One mount to make in the namespace, on `target` (a directory or file that already exists)."""

    target: Path
    source: str
    fstype: str | None = None
    flags: int = 0
    data: str | None = None


@dataclass(frozen=True)
class Mounted:
    """A mount made in the namespace: `target` there, its root held open by the server."""

    target: Path
    fd: int

    @property
    def server_path(self) -> Path:
        """The mount's root as this process reaches it from the host namespace."""
        return Path(f"/proc/self/fd/{self.fd}")

    @property
    def host_path(self) -> Path:
        """The mount's root as any root process on the host reaches it (while this server lives)."""
        return Path(f"/proc/{os.getpid()}/fd/{self.fd}")


class SessionNamespace:
    """A private mount namespace with the requested mounts. Make it with `create`; `close` ends it."""

    def __init__(self, ns_fd: int, mounts: list[Mounted]) -> None:
        #: A descriptor of the namespace (for `setns`); `agentflow-launch --mntns-fd` takes a dup.
        self.ns_fd = ns_fd
        self.mounts = mounts

    @classmethod
    def create(cls, requests: Sequence[MountRequest]) -> SessionNamespace:
        """Make the namespace and its mounts, in order (blocking: call from a worker thread).

        Raises:
            OSError: a mount was refused (nothing is left behind then).
        """
        # A thread of its own: the namespace it moves into is never another task's (worker
        # threads are pooled), and it is gone once the thread exits, but for the descriptors.
        return in_own_thread(lambda: _build(requests), "agentflow-mountns")

    def close(self) -> None:
        """Drop the server's hold; the mounts go once no session process uses them. Idempotent."""
        for fd in [self.ns_fd, *(m.fd for m in self.mounts)]:
            if fd >= 0:
                os.close(fd)
        self.ns_fd = -1
        self.mounts = [Mounted(m.target, -1) for m in self.mounts]


def _build(requests: Sequence[MountRequest]) -> SessionNamespace:
    if _libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNS): {os.strerror(err)}")
    opened: list[int] = []
    try:
        # Private from the root down: nothing mounted here reaches the host (whose / may be a
        # shared mount), and nothing the host mounts later is copied in.
        mount(None, Path("/"), None, MS_REC | MS_PRIVATE, None)
        mounts = []
        for request in requests:
            mount(request.source, request.target, request.fstype, request.flags, request.data)
            fd = os.open(request.target, os.O_PATH | os.O_CLOEXEC)
            opened.append(fd)
            mounts.append(Mounted(request.target, fd))
        ns_fd = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    return SessionNamespace(ns_fd, mounts)
