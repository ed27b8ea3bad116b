"""What this host provides for sandboxing, probed once: cgroups, user namespaces, bwrap, seccomp,
pasta, runsc. `get_status` shows it, and `SessionSandbox.create` refuses a tier whose
mechanism is missing (5001) instead of quietly running with less.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from backends.sandbox import cgroups, gvisor, seccomp
from backends.sandbox.network import filter_tool

PROBE_UID = 65534


def _read_int(path: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(Path(path).read_text().strip())
    return None


def _bwrap_version(path: str) -> tuple[int, ...]:
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
        return tuple(int(x) for x in out.split()[-1].split("."))
    return ()


def _probe_userns(bwrap_path: str, disable_userns: bool) -> tuple[bool, str]:
    """Start a real unprivileged bwrap with the session's namespaces and seccomp filter."""
    prefix = []
    if os.geteuid() == 0:
        prefix = ["setpriv", f"--reuid={PROBE_UID}", f"--regid={PROBE_UID}", "--clear-groups", "--inh-caps=-all"]
    fd = seccomp.filter_fd()
    try:
        result = subprocess.run(
            [
                *prefix,
                bwrap_path,
                "--unshare-all",
                "--unshare-user",
                *(["--disable-userns"] if disable_userns else []),
                "--ro-bind",
                "/usr",
                "/usr",
                "--symlink",
                "usr/lib64",
                "/lib64",
                "--symlink",
                "usr/lib",
                "/lib",
                "--seccomp",
                str(fd),
                "/usr/bin/true",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
            pass_fds=(fd,),
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"bwrap could not start: {exc}"
    finally:
        os.close(fd)
    if result.returncode != 0:
        return False, f"an unprivileged user namespace cannot be created: {result.stderr.strip()[:200]}"
    return True, ""


@functools.cache
def host_mechanisms() -> dict[str, Any]:
    """Probe once; the result is shared by every session of this server."""
    bwrap_path = shutil.which("bwrap")
    version = _bwrap_version(bwrap_path) if bwrap_path else ()
    disable_userns = version >= (0, 8, 0)
    max_userns = _read_int("/proc/sys/user/max_user_namespaces")
    userns_ok, userns_reason = (False, "bubblewrap is not installed")
    if bwrap_path:
        userns_ok, userns_reason = _probe_userns(bwrap_path, disable_userns)
    return {
        "root": os.geteuid() == 0,
        "cgroup": cgroups.probe().describe(),
        "userns": {"available": userns_ok, "max_user_namespaces": max_userns, "reason": userns_reason},
        "bwrap": {
            "path": bwrap_path,
            "version": ".".join(map(str, version)) or None,
            "disable_userns": disable_userns,
        },
        "seccomp": {"filter": "bwrap --seccomp (classic BPF)", "denied_syscalls": sorted(seccomp.DENIED_SYSCALLS)},
        "pasta": shutil.which("pasta"),
        "packet_filter": filter_tool(),
        "runsc": {"path": gvisor.runsc_path(), "version": gvisor.runsc_version()},
    }


def mechanisms() -> dict[str, Any]:
    """What this host provides (for `get_status`): cgroups, userns, seccomp, pasta, runsc, tiers."""
    mech = dict(host_mechanisms())
    tiers = {"none": "available"}
    tiers["sandbox"] = "available" if mech["userns"]["available"] else f"unavailable: {mech['userns']['reason']}"
    if not mech["runsc"]["path"]:
        tiers["gvisor"] = "unavailable: runsc is not installed"
    elif not mech["root"]:
        tiers["gvisor"] = "unavailable: the server is not root"
    else:
        tiers["gvisor"] = "available"
    mech["tiers"] = tiers
    mech["networks"] = {"none": "available", "host": "available", "internet": "unavailable (no destination filter)"}
    cg = mech["cgroup"]
    mech["limits_mechanism"] = f"cgroup v{cg['version']}" if cg["version"] else "rlimits (best effort)"
    return mech
