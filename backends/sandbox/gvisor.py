"""The `gvisor` tier: each process of a session runs as an OCI container under `runsc`.

Threat: hostile code that attacks the host kernel itself (a kernel bug reachable from a
syscall). gVisor's Sentry implements Linux in user space, so the session's syscalls never
reach the host kernel directly; files reach it through the gofer, limited to the bundle's
mounts: read-only /usr and /etc, the session's home and /tmp (host tmpfs mounts, size-capped),
the operator's binds. The session runs as its own non-root uid inside, with no capabilities
and `noNewPrivileges`. Network `none` is gVisor's own empty netstack; `host` passes the host's.

Why a bundle and not `runsc do`: `do` shows the whole host root (read-only) to the sandbox,
including other sessions' homes and /root.

Debian 12's runsc (2022) answers EINVAL to `statx`/`fstatat` with AT_NO_AUTOMOUNT, which
breaks `ls`, `stat`, `cp`. A ten-line LD_PRELOAD shim (gvisor_statx_shim.c), built once with
the host C compiler, strips that flag inside the sandbox; without a compiler the tier is
refused (ConfigurationError) rather than offered broken.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from backends.sandbox import buildcache
from backends.sandbox.bwrap import HIDDEN_ETC, RO_DIRS, USR_LINKS, check_env
from backends.sandbox.spec import HOME_INSIDE, Bind
from session.errors import ConfigurationError

log = logging.getLogger(__name__)

STATE_ROOT = Path("/run/agentflow/runsc")
SHIM_DIR = Path("/run/agentflow/gvisor-lib")
SHIM_INSIDE = "/.agentflow/lib"
SHIM_NAME = "statx-shim.so"
#: Host threads and processes gVisor itself needs (Sentry, gofer, stubs) beyond the session's own.
PIDS_OVERHEAD = 256
_SHIM_SOURCE = Path(__file__).with_name("gvisor_statx_shim.c")


def runsc_path() -> str | None:
    return shutil.which("runsc")


@functools.cache
def runsc_version() -> str | None:
    path = runsc_path()
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines()[0] if out.stdout else None


def _compile_shim(output: Path) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise buildcache.CacheUnusable(
            "this runsc build rejects AT_NO_AUTOMOUNT (ls/stat fail) and no C compiler is installed to build "
            "the small compatibility shim (apt-get install gcc)"
        )
    result = subprocess.run(
        [compiler, "-O2", "-shared", "-fPIC", "-nostartfiles", "-o", str(output), str(_SHIM_SOURCE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise buildcache.CacheUnusable(f"building the statx shim failed: {result.stderr[:300]}")


def shim_cache() -> buildcache.CachedBuild:
    """The shim's build cache under `SHIM_DIR` (looked up on each adoption), pruned like the launcher's."""
    key = buildcache.key(_SHIM_SOURCE.read_bytes())
    return buildcache.CachedBuild(SHIM_NAME, key, root=lambda: SHIM_DIR, compile=_compile_shim)


_shim = shim_cache()


def shim_dir() -> Path:
    """The directory holding the built statx shim (built on first use, rebuilt if it vanished since).

    Raises:
        ConfigurationError: no C compiler, or it failed (the tier cannot run `ls` without it).
    """
    try:
        return _shim.get().parent
    except buildcache.CacheUnusable as exc:
        raise ConfigurationError(f"isolation 'gvisor' is unavailable: {exc}") from None


def _mount(destination: str, source: str, *, writable: bool) -> dict[str, Any]:
    options = ["rbind", "rw" if writable else "ro"]
    return {"destination": destination, "type": "bind", "source": source, "options": options}


def write_bundle(
    bundle: Path,
    *,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    uid: int,
    pids: int,
    home: Path,
    tmp: Path,
    binds: Sequence[Bind],
    hostname: str,
    host_network: bool = False,
    etc_files: Mapping[str, bytes] | None = None,
) -> None:
    """Write an OCI bundle (config.json + an empty read-only rootfs of mount points).

    `etc_files`: files shown read-only in place of the host's (bwrap.identity_files), written
    into the bundle and bound from there.
    """
    rootfs = bundle / "rootfs"
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
    ]
    for path in RO_DIRS:
        if os.path.isdir(path):
            mounts.append(_mount(path, path, writable=False))
    for path in USR_LINKS:
        if os.path.islink(path):
            (rootfs / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(path), rootfs / path.lstrip("/"))
        elif os.path.isdir(path):
            mounts.append(_mount(path, path, writable=False))
    for path in HIDDEN_ETC:
        if os.path.exists(path):
            mounts.append(_mount(path, "/dev/null", writable=False))
    file_destinations = [*HIDDEN_ETC]  # mounted onto files: no directory made for them
    for index, (path, content) in enumerate((etc_files or {}).items()):
        copy = bundle / f"etc-{index}"
        copy.write_bytes(content)
        copy.chmod(0o644)
        mounts.append(_mount(path, str(copy), writable=False))
        file_destinations.append(path)
    mounts += [
        _mount(HOME_INSIDE, str(home), writable=True),
        _mount("/tmp", str(tmp), writable=True),
        _mount(SHIM_INSIDE, str(shim_dir()), writable=False),
    ]
    mounts += [_mount(b.inside, str(b.host), writable=b.writable) for b in binds]
    for mount in mounts:
        if mount["type"] == "bind" and mount["destination"] not in file_destinations:
            (rootfs / mount["destination"].lstrip("/")).mkdir(parents=True, exist_ok=True)
    for name in ("proc", "dev"):
        (rootfs / name).mkdir(exist_ok=True)
    inside_env = check_env(env)
    preload = f"{SHIM_INSIDE}/{SHIM_NAME}"
    if inside_env.get("LD_PRELOAD"):
        preload += " " + inside_env["LD_PRELOAD"]
    inside_env["LD_PRELOAD"] = preload
    # With the host's network, the sandbox must stay in the host's network namespace.
    namespaces = ["pid", "ipc", "uts", "mount"] if host_network else ["pid", "network", "ipc", "uts", "mount"]
    no_caps: dict[str, list[str]] = {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
    config = {
        "ociVersion": "1.0.0",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": uid},
            "args": list(argv),
            "env": [f"{k}={v}" for k, v in inside_env.items()],
            "cwd": cwd,
            "noNewPrivileges": True,
            "capabilities": no_caps,
            # The Sentry enforces this inside; the host cgroup's pids.max is raised by PIDS_OVERHEAD for gVisor itself.
            "rlimits": [{"type": "RLIMIT_NPROC", "hard": pids, "soft": pids}],
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {"namespaces": [{"type": t} for t in namespaces]},
    }
    fd = os.open(bundle / "config.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(config, fh)


def run_argv(state: Path, bundle: Path, container_id: str, *, network: str) -> list[str]:
    path = runsc_path()
    if path is None:
        raise ConfigurationError("isolation 'gvisor' is unavailable: runsc is not installed (apt-get install runsc)")
    # --ignore-cgroups: otherwise runsc moves its sandbox and gofer out of the session's cgroups,
    # escaping the limits and the membership cleanup relies on.
    return [
        path,
        "--root",
        str(state),
        "--ignore-cgroups",
        f"--network={network}",
        "run",
        "--bundle",
        str(bundle),
        container_id,
    ]
