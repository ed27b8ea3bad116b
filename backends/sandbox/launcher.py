"""`agentflow-launch`: the small C program every session spawn starts with (see launcher.c).

It joins the session's cgroups through descriptors the server opened, sets the niceness, drops
to the session's uid with no capabilities, resets every signal disposition, then execs: the
work of `sh -c ENTER` + `setpriv` + `env --default-signal` in one exec instead of three (each
exec costs ~0.6 ms of CPU on a small machine, and a session start paid five).

Built on first use with the host C compiler and cached by source hash, like the gVisor shim:
`/run/agentflow/launch/<hash>/agentflow-launch` for a root server (root-owned, 0755), a private
0700 directory under the temp dir otherwise. Two servers building at once each compile to a
file of their own and rename it into place (atomic; the results are identical). The cache
directory must be owned by this uid and writable by nobody else, or it is not used: a binary
every session runs through must not be replaceable by someone else.

Without a compiler, or when the build or its self-test fails, `path()` logs one warning and
returns None: the sandbox then runs the old chain, which is slower but equally strict.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("launcher.c")
NAME = "agentflow-launch"
ROOT_CACHE = Path("/run/agentflow/launch")
#: The compiler's whole environment (never the server's: no LD_PRELOAD, no CFLAGS surprises).
_BUILD_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
_BUILD_TIMEOUT = 120.0
_FLAGS = ("-O2", "-Wall", "-Wextra", "-Werror")
_RECIPE = " ".join((*_FLAGS, "-static|dynamic"))


class LauncherUnavailable(Exception):
    """The launcher cannot be built or run here (the reason is the message)."""


def cache_root() -> Path:
    """Where built launchers are kept for this server's uid."""
    if os.geteuid() == 0:
        return ROOT_CACHE
    return Path(tempfile.gettempdir()) / f"agentflow-launch-{os.geteuid()}"


def _safe_dir(path: Path, mode: int) -> None:
    """Make `path` (and missing parents) and check it is ours alone to write.

    Raises:
        LauncherUnavailable: it is a symlink, owned by another uid, or writable by others.
    """
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
        info = path.lstat()
    except OSError as exc:
        raise LauncherUnavailable(f"cannot make the cache directory {path}: {exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise LauncherUnavailable(f"{path} is not a directory")
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise LauncherUnavailable(
            f"{path} is owned by uid {info.st_uid} with mode {info.st_mode & 0o7777:o}: "
            f"it must be owned by uid {os.geteuid()} and writable by it alone"
        )


def _compile(compiler: str, output: Path) -> None:
    """Compile launcher.c to `output`: static first (no dynamic loader at all), else dynamic."""
    common = [compiler, *_FLAGS, "-o", str(output), str(SOURCE)]
    errors = []
    for extra in (["-static"], []):
        try:
            result = subprocess.run(
                [*common, *extra],
                env=_BUILD_ENV,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_BUILD_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise LauncherUnavailable(f"running {compiler} failed: {exc}") from None
        if result.returncode == 0:
            return
        errors.append(result.stderr.strip()[-300:])
    raise LauncherUnavailable(f"{compiler} failed: {errors[-1]}")


def _self_test(binary: Path) -> None:
    """Run it once: a cache on a noexec mount, or a broken build, shows here, not in a session."""
    try:
        result = subprocess.run(
            [str(binary), "--", "/bin/true"],
            env=_BUILD_ENV,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise LauncherUnavailable(f"{binary} does not run: {exc}") from None
    if result.returncode != 0:
        raise LauncherUnavailable(f"{binary} self-test exited {result.returncode}: {result.stderr.strip()[:300]}")


def build(root: Path) -> Path:
    """The launcher built from this source under `root` (compiled now if missing).

    Raises:
        LauncherUnavailable: no compiler, the build failed, or the cache is unsafe.
    """
    # The recipe is part of the key: a change of flags must not reuse an old build.
    digest = hashlib.sha256(SOURCE.read_bytes() + _RECIPE.encode()).hexdigest()[:16]
    _safe_dir(root, 0o755 if os.geteuid() == 0 else 0o700)
    target_dir = root / digest
    _safe_dir(target_dir, 0o755)
    target = target_dir / NAME
    try:
        info = target.lstat()
    except FileNotFoundError:
        info = None
    if info is not None and stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o022:
        return target
    compiler = shutil.which("cc", path=_BUILD_ENV["PATH"]) or shutil.which("gcc", path=_BUILD_ENV["PATH"])
    if compiler is None:
        raise LauncherUnavailable("no C compiler (cc or gcc) is installed")
    partial = target_dir / f".{NAME}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        _compile(compiler, partial)
        partial.chmod(0o755)
        partial.replace(target)  # atomic: a concurrent builder's identical file, or ours
    finally:
        partial.unlink(missing_ok=True)
    return target


_building = threading.Lock()


def path() -> str | None:
    """The launcher's path, built and self-tested once per server; None (warned once) if unavailable."""
    with _building:  # sessions are created in worker threads: one build, one warning
        return _path()


@functools.cache
def _path() -> str | None:
    try:
        binary = build(cache_root())
        _self_test(binary)
    except LauncherUnavailable as exc:
        log.warning(
            "the session launcher is unavailable (%s); sessions start through sh + setpriv + env instead "
            "(same isolation, ~1.5 ms more CPU per start)",
            exc,
        )
        return None
    return str(binary)
