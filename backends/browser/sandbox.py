"""The shared Chromium's confinement: an unprivileged uid, bubblewrap, its own network namespace.

Threat: a page that exploits the renderer, or a session that could reach the browser
process, must not gain the server's uid (root), read the host's files, or open network
connections the egress proxy did not check. So each Chromium launch runs through a small
generated wrapper script (Playwright's `executable_path`) that, as root, hands the
launch's profile directory to the browser uid and then execs

    setpriv --reuid/--regid UID --clear-groups --no-new-privs (all capabilities dropped)
      bwrap --unshare-all [--share-net] --die-with-parent --new-session --cap-drop ALL
            (host read-only and minimal, private /tmp, the launch dir writable)
        -- chromium "$@"

Chromium's own sandbox stays ON (no `--no-sandbox`): it needs to create user namespaces,
which the sandbox's seccomp filter (`seccomp.py`) allows while denying ptrace, bpf, keyrings,
mounts and the rest. Playwright's pipes
(fds 3 and 4) pass through setpriv and bwrap untouched, so the driver stays reachable
only by the server. The PID namespace makes every Chromium process die with bwrap.

When the server runs as root, the sandbox also gets its own network namespace
(`--unshare-net`: only its own `lo`). The server then makes the proxy's listening socket
*inside* that namespace (`listen_in_netns`): Chromium can reach the proxy and nothing
else, even if a compromised network service ignored its proxy settings. Without root
(no `setns` into the sandbox's namespace, no uid switch) Chromium shares the host's
network and runs as the server's own uid; the proxy alone then enforces the policy.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path

from backends.browser import seccomp
from backends.sandbox.own_thread import in_own_thread

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
#: Where Chromium finds the proxy inside its own network namespace (nothing else listens there).
NETNS_PROXY_PORT = 3128

#: What of /etc Chromium needs (fonts, TLS roots, its Debian launcher's config, name service files).
ETC_ENTRIES = (
    "alternatives",
    "ca-certificates",
    "chromium",
    "chromium.d",
    "fonts",
    "group",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "mime.types",
    "nsswitch.conf",
    "passwd",
    "ssl",
)


@dataclass(frozen=True, slots=True)
class SandboxPlan:
    """How one Chromium launch is confined."""

    launch_dir: Path
    uid: int | None
    own_network: bool
    executable: str
    tag: str | None = None
    seccomp: bool = True
    display: str | None = None
    xauthority: Path | None = None
    x11_socket_dir: Path | None = None

    @property
    def home(self) -> Path:
        return self.launch_dir / "home"

    @property
    def downloads(self) -> Path:
        return self.launch_dir / "downloads"

    @property
    def info_file(self) -> Path:
        return self.launch_dir / "bwrap-info.json"

    @property
    def seccomp_file(self) -> Path:
        return self.launch_dir / "seccomp.bpf"

    @property
    def wrapper(self) -> Path:
        return self.launch_dir / "chromium-sandboxed"


def can_confine() -> bool:
    """Whether this process may switch uids and enter other network namespaces (root)."""
    return os.geteuid() == 0


def prepare(plan: SandboxPlan) -> Path:
    """Make the launch's directories (owned by the browser uid) and write the wrapper; returns it."""
    for path in (plan.launch_dir, plan.home, plan.downloads):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.chmod(0o700)
        if plan.uid is not None:
            os.chown(path, plan.uid, plan.uid)
    if plan.seccomp:
        plan.seccomp_file.write_bytes(seccomp.program())
        plan.seccomp_file.chmod(0o600)
    plan.wrapper.write_text(wrapper_script(plan))
    plan.wrapper.chmod(0o700)
    return plan.wrapper


def wrapper_script(plan: SandboxPlan) -> str:
    """The shell script Playwright runs as 'Chromium'."""
    q = shlex.quote
    bwrap = [
        "bwrap",
        "--unshare-all",
        *([] if plan.own_network else ["--share-net"]),
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--ro-bind",
        "/usr",
        "/usr",
        *["--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin"],
        *["--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64"],
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/run",
        "--ro-bind-try",
        "/var/cache/fontconfig",
        "/var/cache/fontconfig",
    ]
    for entry in ETC_ENTRIES:
        bwrap += ["--ro-bind-try", f"/etc/{entry}", f"/etc/{entry}"]
    # bwrap runs as the browser uid: every parent of the launch dir must be traversable (the
    # engine's scratch root is 0711; `check_traversable` says so before a launch).
    bwrap += ["--bind", str(plan.launch_dir), str(plan.launch_dir)]
    env = {
        "HOME": str(plan.home),
        "XDG_CONFIG_HOME": f"{plan.home}/.config",
        "XDG_CACHE_HOME": f"{plan.home}/.cache",
        "TMPDIR": "/tmp",
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
    }
    if plan.tag is not None:
        env["AGENTFLOW_SESSION"] = plan.tag  # the main process keeps it; helpers keep the profile path
    if plan.display is not None:
        env["DISPLAY"] = plan.display
        if plan.x11_socket_dir is not None:
            bwrap += ["--ro-bind", str(plan.x11_socket_dir), "/tmp/.X11-unix"]
        if plan.xauthority is not None:
            env["XAUTHORITY"] = str(plan.xauthority)
    bwrap += ["--clearenv"]
    for key, value in env.items():
        bwrap += ["--setenv", key, value]
    if plan.seccomp:
        bwrap += ["--seccomp", "9"]
    bwrap += ["--info-fd", "5", "--", plan.executable]
    command = " ".join(q(word) for word in bwrap) + ' "$@"'
    # --pdeathsig: bwrap's own --die-with-parent covers only the sandboxed processes; this
    # kills bwrap itself (and so its PID namespace) when the Playwright driver dies.
    drop = "--no-new-privs --pdeathsig=KILL"
    if plan.uid is not None:
        uid = str(plan.uid)
        drop = f"--reuid={uid} --regid={uid} --clear-groups --inh-caps=-all --bounding-set=-all {drop}"
    command = f"setpriv {drop} {command}"
    seccomp_fd = f" 9<{q(str(plan.seccomp_file))}" if plan.seccomp else ""
    chown = f'chown -R {plan.uid}:{plan.uid} "$profile"' if plan.uid is not None else ":"
    return f"""#!/bin/sh
# Generated by backends/browser/sandbox.py: Playwright runs this as Chromium.
# Playwright's pipes are fds 3 and 4; they pass through setpriv and bwrap unchanged.
set -eu
profile=""
for arg in "$@"; do
  case "$arg" in --user-data-dir=*) profile="${{arg#--user-data-dir=}}" ;; esac
done
if [ -z "$profile" ]; then echo "chromium-sandboxed: no --user-data-dir" >&2; exit 2; fi
# Playwright made the profile in the host's temporary directory: hand it to the browser uid
# and bind it in at the same path.
{chown}
exec 5>{q(str(plan.info_file))}{seccomp_fd}
exec {command.replace(" --info-fd", ' --bind "$profile" "$profile" --info-fd')}
"""


def check_traversable(path: Path) -> None:
    """Raise OSError unless every parent of `path` lets other uids pass (x for others).

    The browser uid must reach its launch dir and a linked desktop's X socket dir by path.
    """
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            raise OSError(
                f"{parent} (mode {oct(mode & 0o777)}) is not traversable by the browser's uid; the scratch root "
                "and its parents must be mode 0711 or wider"
            )


def sandbox_child_pid(plan: SandboxPlan) -> int | None:
    """The pid (in our namespace) of the first process inside the sandbox, from bwrap's info."""
    try:
        info = json.loads(plan.info_file.read_text() or "{}")
    except (OSError, ValueError):
        return None
    pid = info.get("child-pid")
    return pid if isinstance(pid, int) else None


def listen_in_netns(pid: int, host: str, port: int) -> socket.socket:
    """A listening TCP socket made inside the network namespace of process `pid`.

    A socket stays in the namespace it was created in, so the server can serve Chromium's
    isolated `lo` without Chromium reaching the host's. `setns` changes only the calling
    thread, so this runs in a thread of its own that ends right after: no pooled thread
    is ever left in the sandbox's namespace.

    Raises:
        OSError: the namespace cannot be entered or the socket not bound.
    """

    def work() -> socket.socket:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into the browser sandbox's network: {os.strerror(err)}")
        finally:
            os.close(fd)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        return sock

    return in_own_thread(work, "browser-netns")
