"""`agentflow-launch`: the small C program every session spawn starts with (see launcher.c).

It joins the session's cgroups through descriptors the server opened, sets the niceness, drops
to the session's uid with no capabilities, resets every signal disposition, then execs: the
work of `sh -c ENTER` + `setpriv` + `env --default-signal` in one exec instead of three (each
exec costs ~0.6 ms of CPU on a small machine, and a session start paid five).

Built on first use, static, with musl when `musl-gcc` is installed (glibc's start-up alone costs
~0.5 ms per exec on a virtual machine), else with the host C compiler, and cached by source hash
like the gVisor shim (backends/sandbox/buildcache.py: trust, re-verification, pruning):
`/run/agentflow/launch/<hash>/`
for a root server (root-owned, 0755), a private 0700 directory under the temp dir otherwise.
`path()` is called once per session setup: one `lstat` there notices a launcher deleted or
replaced while the server runs, and the next session gets a fresh build (a replaced one is
never run); spawns themselves pay nothing.

Without a compiler, or when the build or its self-test fails, `path()` logs one warning and
returns None from then on: the sandbox then runs the old chain, which is slower but equally strict.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from backends.sandbox import buildcache

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("launcher.c")
NAME = "agentflow-launch"
ROOT_CACHE = Path("/run/agentflow/launch")
#: The compiler's whole environment (never the server's: no LD_PRELOAD, no CFLAGS surprises).
_BUILD_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
_BUILD_TIMEOUT = 120.0
_FLAGS = ("-O2", "-Wall", "-Wextra", "-Werror")
#: musl first: glibc's start-up asks the CPU about its caches with ~80 CPUID instructions, and
#: each one traps to the hypervisor on a virtual machine (~7 us here). A musl build execs in
#: ~0.03 ms against ~0.55 ms for a static glibc one, on every session spawn.
_TOOLCHAINS = (("musl-gcc", ("-static",)), ("cc", ("-static",)), ("cc", ()))
_RECIPE = " ".join(_FLAGS) + " " + "|".join(f"{cc} {' '.join(extra)}" for cc, extra in _TOOLCHAINS)
#: The only kernel headers the launcher includes; musl-gcc does not search the system's.
_KERNEL_HEADERS = ("linux", "asm", "asm-generic")


class LauncherUnavailable(buildcache.CacheUnusable):
    """The launcher cannot be built or run here (the reason is the message)."""


def cache_root() -> Path:
    """Where built launchers are kept for this server's uid."""
    if os.geteuid() == 0:
        return ROOT_CACHE
    return Path(tempfile.gettempdir()) / f"agentflow-launch-{os.geteuid()}"


def _kernel_headers(into: Path) -> list[str]:
    """`-isystem DIR` for musl-gcc: a directory holding only the kernel's header trees (linux,
    asm, asm-generic) as symlinks, so none of glibc's headers can mix with musl's."""
    multiarch = Path("/usr/include") / _multiarch()
    for name in _KERNEL_HEADERS:
        for base in (multiarch, Path("/usr/include")):
            if (base / name).is_dir():
                (into / name).symlink_to(base / name)
                break
        else:
            return []
    return ["-isystem", str(into)]


def _multiarch() -> str:
    try:
        return subprocess.run(
            ["gcc", "-print-multiarch"], env=_BUILD_ENV, capture_output=True, text=True, timeout=30, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _which(name: str) -> str | None:
    found = shutil.which(name, path=_BUILD_ENV["PATH"])
    if found is None and name == "cc":
        found = shutil.which("gcc", path=_BUILD_ENV["PATH"])
    return found


def _compile(output: Path) -> None:
    """Compile launcher.c to `output`: musl static, else static glibc, else dynamic."""
    errors = []
    with tempfile.TemporaryDirectory(prefix="agentflow-launch-build-") as scratch:
        for name, extra in _TOOLCHAINS:
            compiler = _which(name)
            if compiler is None:
                continue
            headers = _kernel_headers(Path(scratch)) if name == "musl-gcc" else []
            if name == "musl-gcc" and not headers:
                continue
            command = [compiler, *_FLAGS, *headers, *extra, "-o", str(output), str(SOURCE)]
            try:
                result = subprocess.run(
                    command,
                    env=_BUILD_ENV,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=_BUILD_TIMEOUT,
                    check=False,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(f"running {compiler} failed: {exc}")
                continue
            if result.returncode == 0:
                return
            errors.append(f"{compiler} failed: {result.stderr.strip()[-300:]}")
    if not errors:
        raise LauncherUnavailable("no C compiler (musl-gcc, cc or gcc) is installed")
    raise LauncherUnavailable(errors[-1])


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


def cache_key() -> str:
    """The name of this source's build directory under the cache root."""
    # The recipe is part of the key: a change of flags must not reuse an old build.
    return buildcache.key(SOURCE.read_bytes(), _RECIPE.encode())


def _cache(root: Callable[[], Path], *, self_test: bool) -> buildcache.CachedBuild:
    test = _self_test if self_test else None
    return buildcache.CachedBuild(NAME, cache_key(), root=root, compile=_compile, self_test=test)


def build(root: Path) -> Path:
    """The launcher built from this source under `root` (compiled now if missing; not self-tested).

    Raises:
        LauncherUnavailable: no compiler, the build failed, or the cache is unsafe.
    """
    try:
        return _cache(lambda: root, self_test=False).get()
    except buildcache.CacheUnusable as exc:
        raise LauncherUnavailable(str(exc)) from None


class ServerLauncher:
    """The launcher of this server: adopted on first use, re-verified on each `path()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # sessions are set up in worker threads: one build, one warning
        # A lambda: the root is looked up on each adoption (tests point it elsewhere).
        self._cache = _cache(lambda: cache_root(), self_test=True)
        self._unavailable = False

    def path(self) -> str | None:
        """The launcher's path; None (warned once, for good) if it cannot be built, run or trusted."""
        with self._lock:
            if self._unavailable:
                return None
            try:
                return str(self._cache.get())
            except buildcache.CacheUnusable as exc:
                self._unavailable = True
                log.warning(
                    "the session launcher is unavailable (%s); sessions start through sh + setpriv + env instead "
                    "(same isolation, ~1.5 ms more CPU per start)",
                    exc,
                )
                return None

    def settled(self) -> bool:
        """Whether `path()` would answer at once: the build is adopted, unchanged and no
        refresh is due, or the launcher was given up. False means it may compile or prune."""
        # Never waits: a lock held means another session is building or checking it.
        if not self._lock.acquire(blocking=False):
            return False
        try:
            return self._unavailable or self._cache.current() is not None
        finally:
            self._lock.release()


_server = ServerLauncher()


def settled() -> bool:
    """Whether `path()` answers at once now (no build, prune or self-test): see ServerLauncher.settled."""
    return _server.settled()


def path() -> str | None:
    """The launcher's path, built and self-tested once per server and re-verified by one lstat per call.

    None (warned once) if unavailable. Call it off the event loop (it may compile), unless
    `settled()` has just said it answers at once.
    """
    return _server.path()
