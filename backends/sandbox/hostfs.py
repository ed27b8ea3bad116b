"""The session's writable storage on the host: a size-capped tmpfs for HOME and one for /tmp.

Threat: a session that fills the host's disk, or that reads another session's files. Each
session's home and /tmp are their own tmpfs mounts (`size=disk_mb`, `mode=0700`, owned by the
session's uid, `nosuid,nodev`), so writing past the cap gets ENOSPC and nothing else on the host
is touched. Both live in host directories the server owns (inside its private scratch root),
so host-side code (a vm backend writing an X authority file) can still reach them.

tmpfs pages are memory: cgroup v1 (and v2) charge them to the memory cgroup of the process that
wrote them, so a session's files also count against its memory limit.
Mounting needs CAP_SYS_ADMIN; a server that is not root gets plain directories (no disk cap)
and `describe()` says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _mount_tmpfs(target: Path, size_mb: int, uid: int, gid: int) -> None:
    data = f"size={size_mb}m,mode=0700,uid={uid},gid={gid}".encode()
    if _libc.mount(b"tmpfs", os.fsencode(target), b"tmpfs", MS_NOSUID | MS_NODEV, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs on {target}: {os.strerror(err)}")


def unmount(target: Path) -> None:
    """Lazily unmount `target` (a busy mount goes once its last user does). Never raises."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
            log.warning("umount %s: %s", target, os.strerror(err))


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below `root`, deepest first (for unmounting a dead server's scratch)."""
    prefix = str(root).rstrip("/") + "/"
    found: list[Path] = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = line.split()[4].replace("\\040", " ")
            if point == str(root) or point.startswith(prefix):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def prepare_dir(path: Path, size_mb: int, uid: int, gid: int, *, cap: bool) -> bool:
    """Make `path` the session's private directory, size-capped when `cap`; True if capped.

    Files already in `path` (put there by the backend before the sandbox existed) are
    copied into the new tmpfs, through a descriptor to the directory underneath.
    """
    path.mkdir(parents=True, exist_ok=True)
    capped = False
    if cap:
        below = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _mount_tmpfs(path, size_mb, uid, gid)
            capped = True
            if os.listdir(below):
                shutil.copytree(f"/proc/self/fd/{below}", path, symlinks=True, dirs_exist_ok=True)
        finally:
            os.close(below)
    os.chown(path, uid, gid)
    os.chmod(path, 0o700)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                os.lchown(os.path.join(root, name), uid, gid)
    return capped
