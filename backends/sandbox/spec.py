"""What a caller asks of a session sandbox: who the session is, its policy, its home and extra binds.

The spec is built by a backend from `SessionSetup` and `Runtime`. Everything in it ends up in
host-side argv (bwrap options, cgroup paths, bundle files), so it is validated here, once:
labels and server ids must be path-safe, bind targets absolute and free of `..`, hostnames
plain. The threat is a session config smuggling path tricks or options into host commands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from backends.policy import Policy
from session.errors import ParameterError

#: Where the session's home appears inside `sandbox` and `gvisor` tiers.
HOME_INSIDE = "/home/user"

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SERVER_ID = re.compile(r"^[A-Za-z0-9_.-]+-(\d+)-[0-9a-fA-F]+$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")


def server_pid(server_id: str) -> int | None:
    """The pid encoded in a server id (`<prefix>-<pid>-<hex>`), or None if it has another form."""
    match = _SERVER_ID.match(server_id)
    return int(match.group(1)) if match else None


def check_inside_path(path: str) -> str:
    """An absolute, normalised path inside the sandbox (no `..`, no empty parts)."""
    parts = path.split("/")
    if not path.startswith("/") or path == "/" or any(p in ("", ".", "..") for p in parts[1:]) or "\0" in path:
        raise ParameterError(f"sandbox path {path!r} must be absolute and normalised (no '..', '.', '//')")
    return path


@dataclass(frozen=True)
class Bind:
    """A host directory (or file) made visible inside the sandbox at `inside`."""

    host: Path
    inside: str
    writable: bool = False

    def __post_init__(self) -> None:
        if not Path(self.host).is_absolute():
            raise ParameterError(f"bind host path {str(self.host)!r} must be absolute")
        check_inside_path(self.inside)


@dataclass(frozen=True)
class SandboxSpec:
    """One session's sandbox request (see the package docstring for the tiers)."""

    label: str
    policy: Policy
    server_id: str
    home: Path
    binds: tuple[Bind, ...] = ()
    hostname: str = "sandbox"
    #: The niceness every process spawned in the sandbox starts with (0: the server's own,
    #: left as is). A warm pool starts its members at a high niceness so refilling it yields
    #: the CPU to calls in flight; `SessionSandbox.renice` moves a session once handed out.
    nice: int = 0

    def __post_init__(self) -> None:
        if not _SAFE_NAME.match(self.label):
            raise ParameterError(f"sandbox label {self.label!r} is not path-safe ([A-Za-z0-9_.-], max 128)")
        if not _SAFE_NAME.match(self.server_id) or server_pid(self.server_id) is None:
            raise ParameterError(f"server id {self.server_id!r} is not of the form <prefix>-<pid>-<hex>")
        if not _HOSTNAME.match(self.hostname):
            raise ParameterError(f"sandbox hostname {self.hostname!r} is not a plain host name")
        if not Path(self.home).is_absolute():
            raise ParameterError(f"sandbox home {str(self.home)!r} must be absolute")
        check_nice(self.nice)


def check_nice(nice: int) -> int:
    """A niceness Linux accepts (-20..19)."""
    if isinstance(nice, bool) or not isinstance(nice, int) or not -20 <= nice <= 19:
        raise ParameterError(f"niceness {nice!r} must be an integer from -20 to 19")
    return nice
