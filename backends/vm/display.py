"""Where a session's desktop comes from: the provider seam and the local Xvfb provider.

A `DisplayProvider` starts a `Desktop`: an X display the backend can reach by name
(input and screenshots go over the X protocol), a way to start applications on it,
and `aclose` to stop everything. The tools only see those. Today's provider runs
Xvfb and a window manager locally; a container or VM provider would implement the
same two classes (e.g. returning a display reachable over a forwarded socket and
spawning apps with `docker exec`).
"""

from __future__ import annotations

import abc
import contextlib
import errno
import logging
import os
import shutil
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import Process
from Xlib import display as xdisplay

from backends.processes import ProcessGroupOwner, make_scratch_dir
from backends.vm.xauth import SERVER_AUTHORITY, new_cookie, write_authority
from session.errors import BackendError, ParameterError

log = logging.getLogger(__name__)

WINDOW_MANAGERS: dict[str, list[str]] = {
    "openbox": ["openbox", "--sm-disable"],
}


@dataclass(frozen=True, slots=True)
class DesktopSpec:
    """What a provider is asked for."""

    width: int
    height: int
    window_manager: str | None = "openbox"
    env: Mapping[str, str] = field(default_factory=dict)
    label: str = "vm"
    start_timeout: float = 10.0


@dataclass(slots=True)
class LaunchedApp:
    pid: int
    argv: list[str]
    log_path: Path | None
    process: Process | None = None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    def log_tail(self, limit: int = 600) -> str:
        if self.log_path is None:
            return ""
        try:
            data = self.log_path.read_bytes()[-limit:]
        except OSError:
            return ""
        return data.decode("utf-8", "replace").strip()


class Desktop(abc.ABC):
    """A running X display of one session, and everything started on it."""

    display_name: str
    width: int
    height: int

    @abc.abstractmethod
    async def launch(self, argv: Sequence[str]) -> LaunchedApp:
        """Start an application on this display.

        Raises:
            ParameterError: the program does not exist or cannot be executed.
        """

    @abc.abstractmethod
    def problem(self) -> str | None:
        """Why the display is unusable (its server died), or None."""

    @abc.abstractmethod
    def pids(self) -> list[int]:
        """Live local processes belonging to this desktop (for diagnostics and tests)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop the display and every process on it; never raises; safe to call twice."""


class DisplayProvider(abc.ABC):
    """Makes desktops."""

    @abc.abstractmethod
    async def start(self, spec: DesktopSpec) -> Desktop:
        """Start a desktop, ready for input and screenshots when this returns.

        Raises:
            BackendError: the display or window manager failed to start.
        """


# -- local Xvfb ------------------------------------------------------------------------


class XvfbDesktop(Desktop):
    """Xvfb plus a window manager, processes owned by one `ProcessGroupOwner`."""

    def __init__(self, spec: DesktopSpec, scratch: Path, owner: ProcessGroupOwner) -> None:
        self.spec = spec
        self.width = spec.width
        self.height = spec.height
        self.display_name = ""
        self.scratch = scratch
        self.home = scratch / "home"
        self.logs = scratch / "logs"
        self.owner = owner
        self.server: Process | None = None
        self.apps: list[LaunchedApp] = []
        self._closed = False
        self.cookie = new_cookie()
        self.authority = scratch / "Xauthority"

    @property
    def display_number(self) -> int:
        return int(self.display_name.lstrip(":"))

    def app_env(self) -> dict[str, str]:
        """Environment of applications: ours, a private HOME and XDG dirs, the display, the config's env."""
        env = {k: v for k, v in os.environ.items() if k not in {"XAUTHORITY", "WAYLAND_DISPLAY"}}
        home = self.home
        env.update(
            DISPLAY=self.display_name,
            XAUTHORITY=str(self.authority),
            HOME=str(home),
            XDG_CONFIG_HOME=str(home / ".config"),
            XDG_CACHE_HOME=str(home / ".cache"),
            XDG_DATA_HOME=str(home / ".local/share"),
            XDG_STATE_HOME=str(home / ".local/state"),
            XDG_RUNTIME_DIR=str(self.scratch / "runtime"),
            TMPDIR=str(self.scratch / "tmp"),
        )
        if env.get("LANG", "C") in {"C", "POSIX", ""} and "LC_ALL" not in env:
            env["LANG"] = "C.UTF-8"  # so terminals accept the Unicode `type` sends
        env.update(self.spec.env)
        return env

    async def launch(self, argv: Sequence[str]) -> LaunchedApp:
        if self._closed:
            raise BackendError("this desktop is closed")
        argv = list(argv)
        log_path = self.logs / f"{len(self.apps):03d}-{Path(argv[0]).name[:40]}.log"
        with log_path.open("ab") as out:
            try:
                process = await self.owner.spawn(
                    argv,
                    env=self.app_env(),
                    cwd=self.home,
                    stdin=subprocess.DEVNULL,
                    stdout=out.fileno(),
                    stderr=subprocess.STDOUT,
                )
            except FileNotFoundError:
                raise ParameterError(
                    f"program not found: {argv[0]!r}; give an installed program (e.g. 'xterm') or its full path"
                ) from None
            except PermissionError:
                raise ParameterError(f"program {argv[0]!r} is not executable") from None
        app = LaunchedApp(pid=process.pid, argv=argv, log_path=log_path, process=process)
        self.apps.append(app)
        log.info("vm %s: launched %s (pid %d) on %s", self.spec.label, argv, app.pid, self.display_name)
        return app

    def problem(self) -> str | None:
        if self._closed:
            return "this desktop was closed"
        if self.server is None or self.server.returncode is not None:
            code = None if self.server is None else self.server.returncode
            return (
                f"the X server of this desktop ({self.display_name}) exited (code {code}); "
                "destroy or reinitialize the vm session to get a new desktop"
            )
        return None

    def pids(self) -> list[int]:
        return self.owner.pids()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self.owner.aclose()
            await anyio.to_thread.run_sync(self._remove_files)
        log.info("vm %s: desktop %s closed", self.spec.label, self.display_name or "(unstarted)")

    def _remove_files(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
        if not self.display_name or self.server is None:
            return
        SERVER_AUTHORITY.remove(self.display_number)
        # A killed Xvfb leaves its lock and socket; remove them if they are ours.
        lock = Path(f"/tmp/.X{self.display_number}-lock")
        try:
            owner_pid = int(lock.read_text().strip())
        except (OSError, ValueError):
            return
        if owner_pid == self.server.pid:
            with contextlib.suppress(OSError):
                lock.unlink()
            with contextlib.suppress(OSError):
                Path(f"/tmp/.X11-unix/X{self.display_number}").unlink()


class XvfbProvider(DisplayProvider):
    """Runs `Xvfb -displayfd` (the server picks a free display number) and a window manager."""

    def __init__(self, *, xvfb: str = "Xvfb", depth: int = 24) -> None:
        self.xvfb = xvfb
        self.depth = depth

    async def start(self, spec: DesktopSpec) -> Desktop:
        scratch = await anyio.to_thread.run_sync(make_scratch_dir, "agentflow-vm-")
        owner = ProcessGroupOwner(f"vm-{spec.label}-{uuid.uuid4().hex[:12]}", grace=1.0)
        desktop = XvfbDesktop(spec, scratch, owner)
        try:
            await anyio.to_thread.run_sync(_make_dirs, scratch)
            with anyio.fail_after(spec.start_timeout):
                await self._start_server(desktop)
                if spec.window_manager:
                    await self._start_window_manager(desktop, spec.window_manager)
        except BaseException as exc:
            await desktop.aclose()
            if isinstance(exc, TimeoutError):
                raise BackendError(
                    f"desktop did not start within {spec.start_timeout:g} s ({_log_tail(scratch)})"
                ) from exc
            raise
        return desktop

    async def _start_server(self, desktop: XvfbDesktop) -> None:
        # Only clients holding this desktop's cookie may connect (other sessions' apps may not).
        await anyio.to_thread.run_sync(write_authority, desktop.authority, {"": desktop.cookie})
        read_fd, write_fd = os.pipe()
        argv = [
            self.xvfb,
            "-auth",
            str(desktop.authority),
            "-displayfd",
            str(write_fd),
            "-screen",
            "0",
            f"{desktop.width}x{desktop.height}x{self.depth}",
            "-nolisten",
            "tcp",
            "-noreset",
            "-dpi",
            "96",
        ]
        log_path = desktop.logs / "xvfb.log"
        try:
            with log_path.open("ab") as out:
                try:
                    desktop.server = await desktop.owner.spawn(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=out.fileno(),
                        stderr=subprocess.STDOUT,
                        pass_fds=(write_fd,),
                    )
                except FileNotFoundError:
                    raise BackendError(f"{self.xvfb} is not installed (apt-get install xvfb openbox)") from None
            os.close(write_fd)
            write_fd = -1
            number = await _read_display_number(read_fd)
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
        if number is None:
            raise BackendError(f"Xvfb failed to start: {_log_tail(desktop.scratch) or 'no output'}")
        desktop.display_name = f":{number}"
        SERVER_AUTHORITY.add(number, desktop.cookie)
        log.info(
            "vm %s: Xvfb %s %dx%d pid %d",
            desktop.spec.label,
            desktop.display_name,
            desktop.width,
            desktop.height,
            desktop.server.pid,
        )

    async def _start_window_manager(self, desktop: XvfbDesktop, name: str) -> None:
        argv = WINDOW_MANAGERS.get(name, [name])
        try:
            app = await desktop.launch(argv)
        except ParameterError as exc:
            raise BackendError(f"window manager {name!r} is not installed ({exc.message})") from None
        # Windows opened before the WM owns the screen get no focus: wait until it does.
        conn = await anyio.to_thread.run_sync(xdisplay.Display, desktop.display_name)
        try:
            while not await anyio.to_thread.run_sync(_wm_ready, conn):
                if app.returncode is not None:
                    raise BackendError(f"window manager {name!r} exited: {app.log_tail() or 'no output'}")
                await anyio.sleep(0.01)
        finally:
            conn.close()


def _make_dirs(scratch: Path) -> None:
    for sub in ("home/.config", "home/.cache", "home/.local/share", "home/.local/state", "logs", "tmp"):
        (scratch / sub).mkdir(parents=True, exist_ok=True)
    (scratch / "runtime").mkdir(mode=0o700, exist_ok=True)


def _log_tail(scratch: Path, limit: int = 400) -> str:
    try:
        data = (scratch / "logs" / "xvfb.log").read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode("utf-8", "replace").strip()


async def _read_display_number(fd: int) -> int | None:
    """Read Xvfb's `-displayfd` answer up to the newline (it writes the two separately)."""
    os.set_blocking(fd, False)
    buf = b""
    while not buf.endswith(b"\n"):
        await anyio.wait_readable(fd)
        try:
            chunk = os.read(fd, 64)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                continue
            raise
        if not chunk:
            return None
        buf += chunk
    try:
        return int(buf.strip())
    except ValueError:
        return None


def _wm_ready(conn: xdisplay.Display) -> bool:
    """True once a window manager advertises itself (`_NET_SUPPORTING_WM_CHECK` on the root)."""
    atom = conn.intern_atom("_NET_SUPPORTING_WM_CHECK", only_if_exists=True)
    return bool(atom) and conn.screen().root.get_full_property(atom, 0) is not None
