"""The session's storage on the host: size-capped tmpfs for HOME and /tmp, and staged binds.

Threat: a session that fills the host's disk, or that reads another session's files. Each
session's home and /tmp are their own tmpfs mounts (`size=disk_mb`, `mode=0700`, owned by the
session's uid, `nosuid,nodev`), so writing past the cap gets ENOSPC and nothing else on the host
is touched.

Staging: the unprivileged bwrap resolves bind sources with the session uid's permissions, and
the server's scratch root is 0700 root. So everything a session binds is mounted (as root) into
a stage directory `/run/agentflow/stage/<server_id>/<label>/` whose path is traversable (0711,
not listable) and bwrap binds from there. The caller's home path becomes a symlink to the
session's home tmpfs (tier `none`: a bind mount, as the session runs at that path), so
host-side code (a vm backend writing a file for the session) still finds it where it asked.
Permissions of a bind's own files still apply.

tmpfs pages are memory: cgroup v1 (and v2) charge them to the memory cgroup of the process that
wrote them, so a session's files also count against its memory limit. Mounting needs
CAP_SYS_ADMIN; a server that is not root gets plain directories (no disk cap) and direct binds
(bwrap then runs as the server's uid, which can walk its own paths), and `describe()` says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from backends.sandbox.spec import Bind

log = logging.getLogger(__name__)

STAGE_ROOT = Path("/run/agentflow/stage")
MS_NOSUID = 2
MS_NODEV = 4
MS_BIND = 4096
MS_REC = 16384
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _mount(source: str, target: Path, fstype: str | None, flags: int, data: str | None) -> None:
    rc = _libc.mount(
        source.encode(),
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


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below `root`, deepest first (for unmounting a dead server's leftovers)."""
    prefix = str(root).rstrip("/") + "/"
    found: list[Path] = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = line.split()[4].replace("\\040", " ")
            if point == str(root) or point.startswith(prefix):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _traversable_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o711)


class SessionStorage:
    """Home, /tmp and binds of one session, as the paths bwrap/runsc should bind from."""

    def __init__(self, server_id: str, label: str, home: Path, uid: int) -> None:
        self.home = home
        self.uid = uid
        self.stage: Path | None = None
        self.stage_key = (server_id, label)
        self.home_source: Path = home
        self.tmp_source: Path | None = None
        self.binds: list[Bind] = []
        self.capped = False
        self._mounted: list[Path] = []
        self._linked = False

    def prepare(self, size_mb: int, binds: Sequence[Bind], *, private_tmp: bool) -> None:
        """Make the home (and /tmp) tmpfs and stage the binds. Raises OSError; `release` undoes."""
        self.home.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            self._own(self.home)
            self.binds = list(binds)
            return
        server_id, label = self.stage_key
        stage = STAGE_ROOT / server_id / label
        for attempt in range(5):
            # Another session's release (in the background after a kill) may remove the
            # server's stage directory, its last session gone, while we make ours: retry.
            # The parents usually exist: one mkdir then, and the walk up only when it fails.
            try:
                if attempt:
                    for directory in (STAGE_ROOT.parent, STAGE_ROOT, STAGE_ROOT / server_id):
                        _traversable_dir(directory)
                os.mkdir(stage, 0o711)  # fails if it exists: never adopt (and later remove) another session's
                break
            except FileNotFoundError:
                if attempt == 4:
                    raise
            except FileExistsError:
                if stage.exists() or attempt == 4:
                    raise
        self.stage = stage
        self.home_source = self._tmpfs("home", size_mb)
        below = os.open(self.home, os.O_RDONLY | os.O_DIRECTORY)
        try:
            seeded = bool(os.listdir(below))
            if seeded:
                shutil.copytree(f"/proc/self/fd/{below}", self.home_source, symlinks=True, dirs_exist_ok=True)
        finally:
            os.close(below)
        if seeded:
            # A fresh tmpfs root is the session's already (mount options uid, gid, mode=0700).
            self._own(self.home_source)
        if private_tmp:
            # Host-side code (a vm backend writing a file for the session) finds the home where
            # it asked through a link: no third mount per session, since every sandbox start
            # copies every host mount into its new mount namespace (measured: 100 more host
            # mounts cost each bwrap start ~1.2 ms, serialised on the kernel's namespace lock).
            # The sandboxed session never sees this path; it sees its home at HOME_INSIDE.
            if seeded:
                shutil.rmtree(self.home)
            else:
                os.rmdir(self.home)
            os.symlink(self.home_source, self.home)
            self._linked = True
        else:
            # Tier `none` runs at the host path itself (its cwd and $HOME): a bind keeps that
            # path a real directory.
            _mount(str(self.home_source), self.home, None, MS_BIND, None)
            self._mounted.append(self.home)
        if private_tmp:
            self.tmp_source = self._tmpfs("tmp", size_mb)
        for index, bind in enumerate(binds):
            staged = self.stage / f"bind{index}"
            if Path(bind.host).is_dir():
                staged.mkdir()
            else:
                staged.touch()
            _mount(str(bind.host), staged, None, MS_BIND | MS_REC, None)
            self._mounted.append(staged)
            self.binds.append(Bind(staged, bind.inside, bind.writable))
        self.capped = True

    def _tmpfs(self, name: str, size_mb: int) -> Path:
        assert self.stage is not None
        target = self.stage / name
        os.mkdir(target, 0o700)
        options = f"size={size_mb}m,mode=0700,uid={self.uid},gid={self.uid}"
        _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, options)
        self._mounted.append(target)
        return target

    def _own(self, path: Path) -> None:
        os.chown(path, self.uid, self.uid)
        path.chmod(0o700)
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    os.lchown(os.path.join(root, name), self.uid, self.uid)

    def release(self) -> None:
        """Unmount everything this session mounted and remove its stage. Never raises."""
        # Only what this session mounted, newest first (the home bind before the tmpfs under it).
        while self._mounted:
            unmount(self._mounted.pop())
        if self._linked:
            # Back to an empty directory, as the caller made it (its owner removes it).
            with contextlib.suppress(OSError):
                os.unlink(self.home)
                os.mkdir(self.home, 0o700)
            self._linked = False
        if self.stage is not None:
            try:
                # What `prepare` made, by name: cheaper than a tree walk, which stays the fallback.
                for entry in os.listdir(self.stage):
                    path = os.path.join(self.stage, entry)
                    try:
                        os.rmdir(path)
                    except NotADirectoryError:
                        os.unlink(path)  # a staged file bind's mount point
                os.rmdir(self.stage)
            except OSError:
                shutil.rmtree(self.stage, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(self.stage.parent)
            self.stage = None
