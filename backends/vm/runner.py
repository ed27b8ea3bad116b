"""Where a desktop's processes run: on the host (isolation `none`) or in the session's sandbox.

Both runners start argv lists with an environment the caller builds from nothing (never
the server's), and own every process they start: `pids()` lists them, `aclose()` leaves
none behind. They also say how paths look to the processes (`inside`), since a sandboxed
app sees its home at /home/user while the server writes it under the session's scratch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from anyio.abc import Process

from backends.policy import Policy
from backends.processes import ProcessGroupOwner
from session.errors import ConfigurationError

log = logging.getLogger(__name__)

#: Where the desktop's X socket directory appears inside a sandbox (the path every X client looks in).
X11_DIR_INSIDE = "/tmp/.X11-unix"
#: Where the desktop's authority file appears inside a sandbox.
XAUTH_DIR_INSIDE = "/tmp/.X11-auth"


@dataclass(frozen=True, slots=True)
class HostPaths:
    """A session's files as the server sees them (all under the session's scratch)."""

    home: Path
    x11_dir: Path
    xauth_dir: Path
    logs: Path
    tmp: Path

    @classmethod
    def under(cls, scratch: Path) -> HostPaths:
        return cls(
            home=scratch / "home",
            x11_dir=scratch / "x11",
            xauth_dir=scratch / "xauth",
            logs=scratch / "logs",
            tmp=scratch / "tmp",
        )

    @property
    def authority(self) -> Path:
        return self.xauth_dir / "Xauthority"


@dataclass(frozen=True, slots=True)
class InsidePaths:
    """The same files as the desktop's processes see them."""

    home: str
    authority: str
    tmp: str


class Runner(Protocol):
    """Starts and owns one desktop's processes."""

    inside: InsidePaths
    sandboxed: bool

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
    ) -> Process: ...

    def x11_socket(self, number: int) -> Path:
        """Where the server finds display `number`'s socket."""
        ...

    def pids(self) -> list[int]: ...

    def describe(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


class HostRunner:
    """Isolation `none`: processes run as the server's user, in their own process group.

    They share the host's /tmp/.X11-unix (so the display number must be free there) and
    see the host's files; only the environment is the desktop's own.
    """

    sandboxed = False

    def __init__(self, paths: HostPaths, tag: str) -> None:
        self.inside = InsidePaths(home=str(paths.home), authority=str(paths.authority), tmp=str(paths.tmp))
        self._owner = ProcessGroupOwner(tag, grace=1.0)

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
        return await self._owner.spawn(
            argv, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr, pass_fds=tuple(pass_fds)
        )

    def x11_socket(self, number: int) -> Path:
        return Path(f"/tmp/.X11-unix/X{number}")

    def pids(self) -> list[int]:
        return self._owner.pids()

    def describe(self) -> dict[str, Any]:
        return {"isolation": "none"}

    async def aclose(self) -> None:
        await self._owner.aclose()


class SandboxRunner:
    """Isolation `sandbox`: every process runs inside the session's bubblewrap sandbox.

    The session's X socket directory is a host directory bound at /tmp/.X11-unix, so the
    server reaches the socket by its host path while other sessions (other uids, other
    mount and network namespaces) cannot; its authority file is bound read-only.
    """

    sandboxed = True

    def __init__(self, sandbox: Any, paths: HostPaths) -> None:
        self._sandbox = sandbox
        self._paths = paths
        self.inside = InsidePaths(
            home=_sandbox_home(), authority=f"{XAUTH_DIR_INSIDE}/{paths.authority.name}", tmp="/tmp"
        )

    @classmethod
    async def create(cls, *, label: str, policy: Policy, server_id: str, paths: HostPaths) -> SandboxRunner:
        """Create the session's sandbox with the desktop's X directories bound in.

        Raises:
            ConfigurationError: the machine cannot provide the sandbox (5001, with the reason).
        """
        try:
            from backends.sandbox import Bind, SandboxSpec, SessionSandbox
        except ImportError as exc:
            raise ConfigurationError(
                f"vm isolation 'sandbox' is unavailable on this server ({exc}); "
                "the operator may set [resources.vm.policy] isolation = 'none' for development"
            ) from None
        spec = SandboxSpec(
            label=label,
            policy=policy,
            server_id=server_id,
            home=paths.home,
            binds=(
                Bind(paths.x11_dir, X11_DIR_INSIDE, writable=True),
                Bind(paths.xauth_dir, XAUTH_DIR_INSIDE, writable=False),
            ),
        )
        sandbox = await SessionSandbox.create(spec)
        return cls(sandbox, paths)

    @property
    def uid(self) -> int | None:
        """The session's host uid, when the sandbox says (its X files are given to it)."""
        uid = getattr(self._sandbox, "uid", None)
        return uid if isinstance(uid, int) else None

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
        process: Process = await self._sandbox.spawn(
            list(argv), env=dict(env), cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr, pass_fds=tuple(pass_fds)
        )
        return process

    def x11_socket(self, number: int) -> Path:
        return self._paths.x11_dir / f"X{number}"

    def pids(self) -> list[int]:
        return sorted(self._sandbox.pids())

    def describe(self) -> dict[str, Any]:
        described = self._sandbox.describe()
        return dict(described) if isinstance(described, Mapping) else {"sandbox": str(described)}

    async def aclose(self) -> None:
        await self._sandbox.aclose()


def _sandbox_home() -> str:
    try:
        from backends.sandbox.spec import HOME_INSIDE
    except ImportError:
        return "/home/user"
    return HOME_INSIDE


def give_to(path: Path, uid: int | None, mode: int) -> None:
    """Make `path` the session's own (its uid, `mode`); without a uid, `mode` alone."""
    if uid is not None:
        os.chown(path, uid, uid)
    os.chmod(path, mode)
