"""The build cache of the small C helpers the sandbox compiles on first use (launcher, gVisor statx shim).

Each helper is built into `<root>/<key>/<name>`, where the key hashes its source and flags, so
servers of different versions share one root without sharing builds. What every helper gets:

- Trust comes from the directories: the root and the build's directory must be owned by this
  uid and writable by nobody else (checked on every adoption), and the file itself must be a
  regular file owned by this uid that nobody else can write. Two servers building at once each
  compile to a file of their own and rename it into place (atomic; the outputs are identical).
- Cheap re-verification: `CachedBuild.get()` compares one `lstat` of the file with the identity
  (device, inode, size, mode, owner, mtime, ctime) recorded when it was verified. A file that
  vanished is rebuilt; one that changed is trusted again only if its content hashes to what was
  verified (another server's identical rebuild), else it is replaced by a fresh build without
  ever being run.
- Pruning: a build directory no server has touched, and whose files nobody has read, for
  `STALE_AFTER` is removed. A server touches its build's directory when it adopts it and again
  every `REFRESH_EVERY` while it uses it. Servers of older versions never touch theirs, but each
  spawn of theirs execs the file: with `relatime` that keeps its atime within a day of the last
  use, hence two days. Pruning takes the root's lock exclusively and never waits for it; builders
  hold it shared, so a build being adopted or compiled is never removed under its server.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Unused this long (seconds), a build of another source is removed (see the module doc for why two days).
STALE_AFTER = 2 * 86400.0
#: A server in use re-touches its build's directory (and prunes) at most this often (seconds).
REFRESH_EVERY = 3600.0
#: Only entries named like a key are ever pruned: nothing else an operator put in the root.
_KEY = re.compile(r"[0-9a-f]{16}")
_PARTIAL_PREFIX = "."


class CacheUnusable(Exception):
    """The helper cannot be built or trusted here (the reason is the message)."""


def key(*parts: bytes) -> str:
    """The cache key of a build: a hash of its source and recipe."""
    return hashlib.sha256(b"".join(parts)).hexdigest()[:16]


def safe_dir(path: Path, mode: int) -> None:
    """Make `path` (and missing parents) and check it is ours alone to write.

    Raises:
        CacheUnusable: it is a symlink, owned by another uid, or writable by others.
    """
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
        info = path.lstat()
    except OSError as exc:
        raise CacheUnusable(f"cannot make the cache directory {path}: {exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise CacheUnusable(f"{path} is not a directory")
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise CacheUnusable(
            f"{path} is owned by uid {info.st_uid} with mode {info.st_mode & 0o7777:o}: "
            f"it must be owned by uid {os.geteuid()} and writable by it alone"
        )


def _open_dir(path: Path | str, dir_fd: int | None = None) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


@contextlib.contextmanager
def builders_lock(root: Path) -> Iterator[None]:
    """Hold the root's lock shared: a pruner skips its turn rather than remove a build in use."""
    try:
        fd = _open_dir(root)
    except OSError as exc:
        raise CacheUnusable(f"cannot open the cache directory {root}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def touch(directory: Path) -> None:
    """Mark a build directory as in use (its mtime is what pruning looks at first)."""
    try:
        os.utime(directory, follow_symlinks=False)
    except OSError as exc:
        log.debug("cannot touch %s: %s", directory, exc)


Identity = tuple[int, int, int, int, int, int, int]


def _identity(info: os.stat_result) -> Identity:
    # ctime too: no one can set it, so a rewrite in place that restores size and mtime still shows.
    return (info.st_dev, info.st_ino, info.st_size, info.st_mode, info.st_uid, info.st_mtime_ns, info.st_ctime_ns)


def identity(path: Path) -> Identity | None:
    """What `lstat` says of `path` (None if it is gone): compared with the verified one on each `get`."""
    try:
        return _identity(path.lstat())
    except OSError:
        return None


@dataclass(frozen=True)
class Verified:
    """A build this server checked: where it is, its identity then, and its content's hash."""

    path: Path
    identity: Identity
    sha256: bytes


def inspect(path: Path) -> Verified | None:
    """The file at `path` if it is one this uid alone can have written, else None (missing or untrusted)."""
    try:
        # O_NOFOLLOW: a symlink is not our build; O_NONBLOCK: a FIFO put there must not hang us.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            log.warning("%s is not a regular file this uid alone can write: not used", path)
            return None
        digest = hashlib.file_digest(file, "sha256").digest()
    return Verified(path, _identity(info), digest)


class CachedBuild:
    """One helper built from source into `<root()>/<key>/<name>`: verified once, re-verified by one lstat.

    `compile(output)` writes the build to `output` (raising CacheUnusable on failure);
    `self_test(path)` runs a fresh or newly adopted build once before it is trusted.
    Thread-safe; `get` is meant to be called off the event loop.
    """

    def __init__(
        self,
        name: str,
        key: str,
        *,
        root: Callable[[], Path],
        compile: Callable[[Path], None],
        self_test: Callable[[Path], None] | None = None,
    ) -> None:
        self.name = name
        self.key = key
        self._root = root
        self._compile = compile
        self._self_test = self_test
        self._lock = threading.Lock()
        self._verified: Verified | None = None
        self._refreshed = -math.inf

    def get(self) -> Path:
        """The build's path: the verified one if unchanged, else rebuilt (or re-adopted) now.

        Raises:
            CacheUnusable: the cache is unsafe, or the build or its self-test failed.
        """
        with self._lock:
            verified = self._verified
            if verified is not None and identity(verified.path) == verified.identity:
                if time.monotonic() - self._refreshed >= REFRESH_EVERY:
                    self._refresh(verified.path.parent.parent)
                return verified.path
            if verified is not None:
                log.info("%s was removed or changed while this server ran: checking it again", verified.path)
            self._verified = None
            root = self._root()
            self._verified = self._adopt(root, verified)
            self._refresh(root)
            return self._verified.path

    def current(self) -> Path | None:
        """The verified build if it is unchanged and no refresh is due (one `lstat`, never a
        build, a prune or a self-test: safe on an event loop); None when `get` has work to do."""
        if not self._lock.acquire(blocking=False):  # a build or check under way
            return None
        try:
            verified = self._verified
            if verified is None or time.monotonic() - self._refreshed >= REFRESH_EVERY:
                return None
            return verified.path if identity(verified.path) == verified.identity else None
        finally:
            self._lock.release()

    def _refresh(self, root: Path) -> None:
        self._refreshed = time.monotonic()
        touch(root / self.key)
        prune(root, self.key)

    def _adopt(self, root: Path, previous: Verified | None) -> Verified:
        safe_dir(root, 0o755 if os.geteuid() == 0 else 0o700)
        with builders_lock(root):
            directory = root / self.key
            safe_dir(directory, 0o755)
            touch(directory)
            target = directory / self.name
            found = inspect(target)
            if found is not None and previous is None:
                # A build another server (of this source) made: the directory's owner vouches for it.
                if self._self_test is not None:
                    self._self_test(target)
                return found
            if found is not None and previous is not None:
                if found.sha256 == previous.sha256:
                    return found  # another server's identical rebuild: already tested
                log.warning("%s is not the build this server verified: replacing it without running it", target)
            partial = directory / f"{_PARTIAL_PREFIX}{self.name}.{os.getpid()}.{secrets.token_hex(4)}"
            try:
                self._compile(partial)
                partial.chmod(0o755)
                partial.replace(target)  # atomic: a concurrent builder's identical file, or ours
            except OSError as exc:
                raise CacheUnusable(f"cannot put the build at {target}: {exc}") from None
            finally:
                partial.unlink(missing_ok=True)
            built = inspect(target)
            if built is None:
                raise CacheUnusable(f"{target} vanished or changed right after it was built")
            if self._self_test is not None:
                self._self_test(target)
            return built


def _last_use(dir_fd: int, name: str) -> float:
    """The latest mtime of the directory and mtime or atime of anything directly in it (no symlink followed)."""
    latest = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime
    fd = _open_dir(name, dir_fd=dir_fd)
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                info = entry.stat(follow_symlinks=False)
                latest = max(latest, info.st_mtime, info.st_atime)
    finally:
        os.close(fd)
    return latest


def prune(root: Path, keep: str, *, stale_after: float = STALE_AFTER) -> list[str]:
    """Remove the build directories under `root` unused for `stale_after` seconds, never `keep`.

    Only real directories named like a key and owned by this uid are candidates; symlinks are
    neither followed nor removed; everything is removed through descriptors of `root`, so nothing
    outside it is touched even if a path is swapped meanwhile. Stale partial files a killed
    build left in `keep` go too. Skipped (nothing removed) while another server builds or
    prunes. Failures are logged, never raised: pruning is housekeeping.

    Returns:
        The names of the directories removed.
    """
    removed: list[str] = []
    try:
        root_fd = _open_dir(root)
    except OSError as exc:
        log.debug("not pruning %s: %s", root, exc)
        return removed
    try:
        try:
            fcntl.flock(root_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return removed
        info = os.fstat(root_fd)
        if info.st_uid != os.geteuid() or info.st_mode & 0o022:
            log.warning("not pruning %s: it is not owned by this uid alone", root)
            return removed
        now = time.time()
        with os.scandir(root_fd) as entries:
            names = [entry.name for entry in entries]
        for name in names:
            try:
                if name == keep:
                    _prune_partials(root_fd, name, now - stale_after)
                elif _KEY.fullmatch(name) and _is_stale(root_fd, name, now - stale_after):
                    shutil.rmtree(name, dir_fd=root_fd)
                    removed.append(name)
            except OSError as exc:
                log.warning("cannot prune the old build %s: %s", root / name, exc)
    finally:
        os.close(root_fd)
    if removed:
        log.info("removed %d old build(s) from %s: %s", len(removed), root, ", ".join(removed))
    return removed


def _is_stale(root_fd: int, name: str, cutoff: float) -> bool:
    info = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        return False
    return _last_use(root_fd, name) < cutoff


def _prune_partials(root_fd: int, name: str, cutoff: float) -> None:
    fd = _open_dir(name, dir_fd=root_fd)
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                if not entry.name.startswith(_PARTIAL_PREFIX):
                    continue
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) and info.st_mtime < cutoff:
                    os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)
