"""The session's storage: size-capped tmpfs for HOME and /tmp, and staged binds.

Threat: a session that fills the host's disk, or that reads another session's files. Each
session's home and /tmp are their own tmpfs mounts (`size=disk_mb`, `mode=0700`, owned by the
session's uid, `nosuid,nodev`), so writing past the cap gets ENOSPC and nothing else on the host
is touched.

Staging: the unprivileged bwrap resolves bind sources with the session uid's permissions, and
the server's scratch root is 0700 root. So everything a session binds is mounted (as root) on a
stage directory `/run/agentflow/stage/<server_id>/<label>/` whose path is traversable (0711,
not listable) and bwrap binds from there.

Where the mounts live (tiers `sandbox` and `gvisor`): in the session's own mount namespace
(`mountns`), never on the host, so a start costs the same with one live session or five hundred
and a dead server leaves no mount. The server reaches the home through a descriptor; the
caller's home path becomes a symlink to it (`/proc/<server pid>/fd/N`), so host-side code (a vm
backend writing a file for the session) still finds it where it asked. Tier `none` runs its
processes on the host at the caller's path, so its tmpfs is mounted there, on the host.
Permissions of a bind's own files still apply.

tmpfs pages are memory: cgroup v1 (and v2) charge them to the memory cgroup of the process that
wrote them, so a session's files also count against its memory limit. Mounting needs
CAP_SYS_ADMIN; a server that is not root gets plain directories (no disk cap) and direct binds
(bwrap then runs as the server's uid, which can walk its own paths), and `describe()` says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from backends.sandbox import mountns
from backends.sandbox.mountns import MS_BIND, MS_NODEV, MS_NOSUID, MS_REC, MountRequest, mount, unmount
from backends.sandbox.spec import Bind

STAGE_ROOT = Path("/run/agentflow/stage")


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


@dataclass
class Sources:
    """Home, /tmp and binds of a session, as paths some process opens to bind them."""

    home: Path
    tmp: Path | None = None
    binds: list[Bind] = field(default_factory=list)


class SessionStorage:
    """Home, /tmp and binds of one session, as the paths bwrap/runsc should bind from.

    `sources`: paths this server opens (bwrap takes descriptors of them). `named`: the same as
    paths inside the session's mount namespace, for a program that resolves them itself there
    (runsc reads them from its bundle). Without a namespace both are host paths.
    """

    def __init__(self, server_id: str, label: str, home: Path, uid: int) -> None:
        self.home = home
        self.uid = uid
        self.stage: Path | None = None
        self.stage_key = (server_id, label)
        self.sources = Sources(home)
        self.named = Sources(home)
        #: The session's mount namespace (tiers `sandbox`/`gvisor` on a root server).
        self.namespace: mountns.SessionNamespace | None = None
        self.capped = False
        self._mounted: list[Path] = []
        self._linked = False

    @property
    def namespace_fd(self) -> int | None:
        """A descriptor of the namespace every spawn of the session must enter, if it has one."""
        return self.namespace.ns_fd if self.namespace is not None else None

    def prepare(self, size_mb: int, binds: Sequence[Bind], *, private_tmp: bool) -> None:
        """Make the home (and /tmp) tmpfs and stage the binds. Raises OSError; `release` undoes.

        `private_tmp` (tiers `sandbox`, `gvisor`): the session gets its own /tmp, and every mount
        lives in the session's own mount namespace. Otherwise (tier `none`) the home tmpfs is
        mounted on the host at the caller's path.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            self._own(self.home)
            self.sources = self.named = Sources(self.home, None, list(binds))
            return
        self.stage = self._make_stage()
        if private_tmp:
            self._prepare_namespace(size_mb, binds)
        else:
            self._prepare_on_host(size_mb, binds)
        self.capped = True

    def _make_stage(self) -> Path:
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
                return stage
            except FileNotFoundError:
                if attempt == 4:
                    raise
            except FileExistsError:
                if stage.exists() or attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def _tmpfs_options(self, size_mb: int) -> str:
        return f"size={size_mb}m,mode=0700,uid={self.uid},gid={self.uid}"

    def _stage_binds(self, binds: Sequence[Bind]) -> list[Path]:
        assert self.stage is not None
        staged_paths = []
        for index, bind in enumerate(binds):
            staged = self.stage / f"bind{index}"
            if Path(bind.host).is_dir():
                staged.mkdir()
            else:
                staged.touch()
            staged_paths.append(staged)
        return staged_paths

    def _prepare_namespace(self, size_mb: int, binds: Sequence[Bind]) -> None:
        assert self.stage is not None
        home, tmp = self.stage / "home", self.stage / "tmp"
        os.mkdir(home, 0o700)
        os.mkdir(tmp, 0o700)
        staged = self._stage_binds(binds)
        options = self._tmpfs_options(size_mb)
        requests = [MountRequest(path, "tmpfs", "tmpfs", MS_NOSUID | MS_NODEV, options) for path in (home, tmp)]
        requests += [
            MountRequest(path, str(bind.host), None, MS_BIND | MS_REC) for path, bind in zip(staged, binds, strict=True)
        ]
        self.namespace = mountns.SessionNamespace.create(requests)
        home_mount, tmp_mount, *bind_mounts = self.namespace.mounts
        self.sources = Sources(
            home_mount.server_path,
            tmp_mount.server_path,
            [Bind(m.server_path, b.inside, b.writable) for m, b in zip(bind_mounts, binds, strict=True)],
        )
        self.named = Sources(
            home, tmp, [Bind(path, b.inside, b.writable) for path, b in zip(staged, binds, strict=True)]
        )
        if self._seed(self.sources.home):
            shutil.rmtree(self.home)
        else:
            os.rmdir(self.home)
        # Host-side code finds the home where it asked; the session never sees this path.
        os.symlink(home_mount.host_path, self.home)
        self._linked = True

    def _prepare_on_host(self, size_mb: int, binds: Sequence[Bind]) -> None:
        """Tier `none`: it runs at the host path itself (its cwd and $HOME), so mount there."""
        assert self.stage is not None
        target = self.stage / "home"
        os.mkdir(target, 0o700)
        mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, self._tmpfs_options(size_mb))
        self._mounted.append(target)
        self._seed(target)
        mount(str(target), self.home, None, MS_BIND, None)
        self._mounted.append(self.home)
        staged_binds = []
        for staged, bind in zip(self._stage_binds(binds), binds, strict=True):
            mount(str(bind.host), staged, None, MS_BIND | MS_REC, None)
            self._mounted.append(staged)
            staged_binds.append(Bind(staged, bind.inside, bind.writable))
        self.sources = self.named = Sources(target, None, staged_binds)

    def _seed(self, home_root: Path) -> bool:
        """Copy what the caller put in its home directory into the fresh tmpfs; True if anything."""
        below = os.open(self.home, os.O_RDONLY | os.O_DIRECTORY)
        try:
            seeded = bool(os.listdir(below))
            if seeded:
                shutil.copytree(f"/proc/self/fd/{below}", home_root, symlinks=True, dirs_exist_ok=True)
        finally:
            os.close(below)
        if seeded:
            # A fresh tmpfs root is the session's already (mount options uid, gid, mode=0700).
            self._own(home_root)
        return seeded

    def _own(self, path: Path) -> None:
        os.chown(path, self.uid, self.uid)
        path.chmod(0o700)
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    os.lchown(os.path.join(root, name), self.uid, self.uid)

    def footprint(self) -> tuple[int, int] | None:
        """(bytes, files) the session's tmpfs mounts hold now: what `release` frees (the kernel
        frees a tmpfs page by page, ~1 ms per 15 MB here). None when it cannot tell."""
        roots = [self.sources.home, self.sources.tmp] if self.capped else []
        used_bytes = used_files = 0
        for root in filter(None, roots):
            try:
                info = os.statvfs(root)
            except OSError:
                return None
            used_bytes += (info.f_blocks - info.f_bfree) * info.f_frsize
            used_files += info.f_files - info.f_ffree
        return used_bytes, used_files

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
        if self.namespace is not None:
            # The mounts go with the namespace once the session's last process is gone (it is).
            self.namespace.close()
            self.namespace = None
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
