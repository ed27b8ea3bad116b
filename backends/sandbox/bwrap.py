"""The `sandbox` tier's command line: bubblewrap, unprivileged, in fresh namespaces, under seccomp.

Threat: hostile code reading or changing the host, other sessions or the server. The session
runs as its own non-root uid (outside, via the launcher or `setpriv`; bwrap is then unprivileged and must build
a user namespace, so it cannot hand out more than that uid has), in new user, pid, ipc, uts,
cgroup, mount and (unless the policy says `host`) network namespaces, with every capability
dropped, no further user namespaces (`--disable-userns` plus the seccomp filter), a new terminal
session (no TIOCSTI into the server's tty) and death with its parent.

The filesystem is built from nothing: read-only /usr, /etc (minus password hashes) and the
merged-/usr links, a private /proc and /dev, the session's own home and /tmp (host tmpfs mounts
owned by its uid) and the binds the operator granted. Not visible: /root, /home, /run, /var,
/srv, /opt, the server's scratch root, other sessions' directories, the host's /proc.

Options, including every `--setenv`, travel through a memfd (`--args FD`), so the session's
environment never appears on a host command line or in a host process's environment.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from backends.sandbox.memfd import data_fd
from backends.sandbox.spec import HOME_INSIDE, Bind
from session.errors import ParameterError

#: Host paths shown read-only in every sandbox (when they exist).
RO_DIRS = ("/usr", "/etc")
#: Top-level names that are symlinks into /usr on merged-/usr hosts, else read-only binds.
USR_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: Files in /etc replaced by /dev/null: hashes are useless to a session and tempting to crack.
HIDDEN_ETC = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers")
TMP_INSIDE = "/tmp"
#: The session's user and group name inside the sandbox (its uid is a leased one the host has
#: no entry for). Without an entry a shell says "I have no name!", `whoami` and tools that ask
#: for a user name fail, and every lookup of the uid (bash makes one at start) falls through
#: /etc/passwd to the NSS modules: systemd's loads three libraries and searches the userdb
#: directories, ~0.2-0.3 ms of CPU per start here (bench/bench_starts.py).
SESSION_USER = "user"
PASSWD, GROUP = Path("/etc/passwd"), Path("/etc/group")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_env(env: Mapping[str, str]) -> dict[str, str]:
    """The session environment, refused if a name or value could confuse the option parser."""
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise ParameterError(f"environment variable name {key!r} is not valid")
        if not isinstance(value, str) or "\0" in value:
            raise ParameterError(f"environment variable {key!r} must be a string without NUL bytes")
    return dict(env)


def bwrap_path() -> str:
    """The bwrap binary (looked up once: the host does not change under a running server)."""
    return _bwrap_path()


@functools.cache
def _bwrap_path() -> str:
    return shutil.which("bwrap") or "/usr/bin/bwrap"


@functools.cache
def _base_layout() -> tuple[str, ...]:
    return tuple(_layout())


def base_layout() -> list[str]:
    """The read-only host view every sandbox starts from (probed once per server)."""
    return list(_base_layout())


def _layout() -> list[str]:
    args: list[str] = []
    for path in RO_DIRS:
        if os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in USR_LINKS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in HIDDEN_ETC:
        if os.path.exists(path):
            args += ["--ro-bind", "/dev/null", path]
    return args


def identity_files(uid: int) -> dict[str, bytes]:
    """/etc/passwd and /etc/group for a sandbox running as `uid` (path -> content): the host's,
    with an entry `user` for `uid` added (and any host entry of that name left out, so the
    name means the session). Empty when the host already has an entry for `uid` (a server
    that is not root runs its sessions as itself)."""
    passwd, group = _host_file(PASSWD), _host_file(GROUP)
    if passwd is None or _has_id(passwd, uid):
        return {}
    files = {str(PASSWD): _with_entry(passwd, f"{SESSION_USER}:x:{uid}:{uid}::{HOME_INSIDE}:/bin/bash")}
    if group is not None and not _has_id(group, uid):
        files[str(GROUP)] = _with_entry(group, f"{SESSION_USER}:x:{uid}:")
    return files


def _host_file(path: Path) -> bytes | None:
    """The host's copy, re-read only when it changed (one stat per call)."""
    try:
        info = path.stat()
    except OSError:
        return None
    return _read_cached(path, info.st_mtime_ns, info.st_size, info.st_ino)


@functools.lru_cache(maxsize=4)
def _read_cached(path: Path, _mtime_ns: int, _size: int, _ino: int) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _has_id(table: bytes, uid: int) -> bool:
    """Whether a passwd or group table has an entry whose id (third field) is `uid`."""
    wanted = str(uid).encode()
    return any(len(fields := line.split(b":")) > 2 and fields[2] == wanted for line in table.splitlines())


def _with_entry(table: bytes, entry: str) -> bytes:
    kept = [line for line in table.splitlines() if line.split(b":", 1)[0] != SESSION_USER.encode()]
    return b"\n".join([*kept, entry.encode()]) + b"\n"


def bind_args(binds: Sequence[Bind], fds: list[int]) -> list[str]:
    """Binds by open descriptor: the unprivileged bwrap could not walk a root-only path (the
    server's 0700 scratch root) to reach them, and a descriptor also pins what was checked."""
    args: list[str] = []
    for bind in binds:
        fd = os.open(bind.host, os.O_PATH | os.O_CLOEXEC)
        fds.append(fd)
        args += ["--bind-fd" if bind.writable else "--ro-bind-fd", str(fd), bind.inside]
    return args


def options(
    *,
    home: Path,
    tmp: Path | None,
    tmp_size_mb: int,
    binds: Sequence[Bind],
    share_net: bool,
    hostname: str,
    env: Mapping[str, str],
    cwd: str,
    seccomp_fd: int,
    fds: list[int],
    etc_files: Mapping[str, bytes] | None = None,
) -> list[str]:
    """Every bwrap option for one process of a session (the command goes after `--`).

    `etc_files`: files shown read-only in place of the host's (see `identity_files`).
    Descriptors opened for binds and files are appended to `fds`; the caller passes them on
    and closes them.
    """
    args = [
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--hostname",
        hostname,
        *base_layout(),
    ]
    for path, content in (etc_files or {}).items():
        fd = data_fd(content, "agentflow-etc")
        fds.append(fd)
        args += ["--ro-bind-data", str(fd), path]
    args += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        # /dev/shm would otherwise be an uncapped tmpfs.
        "--size",
        str(tmp_size_mb << 20),
        "--tmpfs",
        "/dev/shm",
    ]
    if share_net:
        args.append("--share-net")
    own = [Bind(home, HOME_INSIDE, writable=True)]
    if tmp is not None:
        own.append(Bind(tmp, TMP_INSIDE, writable=True))
    else:
        args += ["--size", str(tmp_size_mb << 20), "--tmpfs", TMP_INSIDE]
    args += bind_args([*own, *binds], fds)
    args += ["--symlink", TMP_INSIDE, "/var/tmp"]
    # bwrap's root is a private tmpfs: read-only, so nothing lands outside home and /tmp.
    args += ["--remount-ro", "/"]
    args += ["--seccomp", str(seccomp_fd), "--clearenv"]
    for key, value in check_env(env).items():
        args += ["--setenv", key, value]
    args += ["--chdir", cwd]
    return args


def encode_args(args: Sequence[str]) -> bytes:
    """The `--args FD` format: NUL-terminated arguments."""
    for arg in args:
        if "\0" in arg:
            raise ParameterError("sandbox arguments must not contain NUL bytes")
    return b"".join(os.fsencode(a) + b"\0" for a in args)
