"""Where a desktop's processes run: the session's `SessionSandbox`, and how paths look from there.

Every process of a desktop (Xvfb, the window manager, each launched app) is spawned by
the session's sandbox with an environment the desktop builds from nothing (never the
server's). Under isolation `sandbox` each runs in bubblewrap as the session's own uid;
the desktop's X socket directory is a host directory in the session's scratch, bound at
/tmp/.X11-unix, so the server reaches the socket by its host path while other sessions
(other uids, mount and network namespaces) cannot; the cookie file is bound read-only.
Under isolation `none` they run on the host (own process group and cgroup) and the
socket is the host's /tmp/.X11-unix/X<n>.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anyio.abc import Process

from backends.policy import Policy
from backends.sandbox import Bind, SandboxSpec, SessionSandbox

#: Where the desktop's X socket directory appears inside a sandbox (the path every X client looks in).
X11_DIR_INSIDE = "/tmp/.X11-unix"
#: Where the desktop's authority file's directory appears inside a sandbox.
XAUTH_DIR_INSIDE = "/tmp/.X11-auth"
#: Read-only host directories desktop programs need beyond /usr and /etc.
DESKTOP_HOST_DIRS = ("/var/cache/fontconfig",)
_HOST_DIRS_PRESENT = tuple(p for p in DESKTOP_HOST_DIRS if os.path.isdir(p))
#: The host's X socket directory (isolation `none`).
HOST_X11_DIR = Path("/tmp/.X11-unix")


@dataclass(frozen=True, slots=True)
class HostPaths:
    """A session's files as the server sees them (all under the session's scratch)."""

    home: Path
    x11_dir: Path
    xauth_dir: Path

    @classmethod
    def under(cls, scratch: Path) -> HostPaths:
        return cls(home=scratch / "home", x11_dir=scratch / "x11", xauth_dir=scratch / "xauth")

    @property
    def authority(self) -> Path:
        return self.xauth_dir / "Xauthority"


@dataclass(frozen=True, slots=True)
class InsidePaths:
    """The same files as the desktop's processes see them."""

    home: str
    authority: str
    tmp: str


class Runner:
    """Starts and owns one desktop's processes through the session's sandbox."""

    def __init__(self, sandbox: SessionSandbox, paths: HostPaths) -> None:
        self.sandbox = sandbox
        self.paths = paths
        self.sandboxed = sandbox.tier != "none"
        #: The host name the desktop's processes see (their X cookie entry names it).
        self.hostname = sandbox.spec.hostname if self.sandboxed else socket.gethostname()
        if self.sandboxed:
            self.inside = InsidePaths(
                home=sandbox.home_path, authority=f"{XAUTH_DIR_INSIDE}/{paths.authority.name}", tmp="/tmp"
            )
        else:
            self.inside = InsidePaths(home=sandbox.home_path, authority=str(paths.authority), tmp="/tmp")

    @classmethod
    async def create(cls, *, label: str, policy: Policy, server_id: str, paths: HostPaths) -> Runner:
        """Create the session's sandbox with the desktop's X directories bound in.

        Raises:
            ConfigurationError: the machine cannot provide the policy's tier (5001, with the reason).
        """
        binds = [
            Bind(paths.x11_dir, X11_DIR_INSIDE, writable=True),
            Bind(paths.xauth_dir, XAUTH_DIR_INSIDE, writable=False),
        ]
        # Without the host's font cache every app rebuilds it in its home (seconds per start).
        binds += [Bind(Path(p), p) for p in _HOST_DIRS_PRESENT]
        spec = SandboxSpec(label=label, policy=policy, server_id=server_id, home=paths.home, binds=tuple(binds))
        return cls(await SessionSandbox.create(spec), paths)

    @property
    def uid(self) -> int | None:
        """The uid the desktop's processes run as, when it is the session's own."""
        return self.sandbox.uid if self.sandboxed else None

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        stdin: int | None,
        stdout: int | None,
        stderr: int | None,
        pass_fds: Sequence[int] = (),
    ) -> Process:
        return await self.sandbox.spawn(
            argv, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr, pass_fds=pass_fds
        )

    def x11_socket(self, number: int) -> Path:
        """Where the server finds display `number`'s socket."""
        return (self.paths.x11_dir if self.sandboxed else HOST_X11_DIR) / f"X{number}"

    def limits_hit(self) -> str:
        """Which of the session's limits were hit so far, for an error message ('' if none)."""
        hits = {name: count for name, count in self.sandbox.limit_hits().items() if count}
        if not hits:
            return ""
        named = ", ".join(f"{name} ({count}x)" for name, count in sorted(hits.items()))
        return f"the session hit its limits: {named}"

    def pids(self) -> list[int]:
        return sorted(self.sandbox.pids())

    def describe(self) -> dict[str, Any]:
        return self.sandbox.describe()

    async def aclose(self) -> None:
        await self.sandbox.aclose()


def give_to(path: Path, uid: int | None, mode: int) -> None:
    """Make `path` the session's own (its uid, `mode`); without a uid, `mode` alone."""
    if uid is not None:
        os.chown(path, uid, uid)
    os.chmod(path, mode)
