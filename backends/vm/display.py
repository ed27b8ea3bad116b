"""Where a session's desktop comes from: the provider seam and the Xvfb provider.

A `DisplayProvider` starts a `Desktop`: an X display the server reaches through an
`XEndpoint` (socket path and cookie), a way to start applications on it, and `aclose`
to stop everything. The tools only see those. Today's provider runs Xvfb and a window
manager through a `Runner` (on the host, or inside the session's sandbox); a container
or VM provider would implement the same two classes.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from anyio.abc import Process
from Xlib import display as xdisplay

from backends.vm.allocator import DisplayAllocator
from backends.vm.runner import HostPaths, Runner, give_to
from backends.vm.xauth import desktop_entries, new_cookie, write_authority
from backends.vm.xconnect import XEndpoint, open_display
from session.errors import BackendError, ParameterError

log = logging.getLogger(__name__)

WINDOW_MANAGERS: dict[str, list[str]] = {
    "openbox": ["openbox", "--sm-disable"],
}
#: At most this much of a program's output is ever echoed to a client.
OUTPUT_ECHO_CHARS = 200
#: The search path of launched programs (never the server's).
APP_PATH = "/usr/local/bin:/usr/bin:/bin"
#: How many display numbers a host desktop tries when other programs hold the first ones.
HOST_DISPLAY_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class DesktopSpec:
    """What a provider is asked for."""

    width: int
    height: int
    window_manager: str | None = "openbox"
    env: Mapping[str, str] = field(default_factory=dict)
    label: str = "vm"
    start_timeout: float = 10.0


class OutputLog:
    """Where one program's output goes: an unnamed file in the session's own home.

    The home is the session's size-capped storage, so a program printing without end fills
    its own quota, not the host's disk. The file has no name (`O_TMPFILE`), so nothing in
    the session can swap it for a link to a host file the server would then read back.
    """

    def __init__(self, directory: Path, fallback: Path) -> None:
        try:
            self.fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:
            # A filesystem without O_TMPFILE: an unlinked file in the server's own scratch.
            with tempfile.TemporaryFile(dir=fallback) as handle:
                self.fd = os.dup(handle.fileno())

    def read(self, limit: int) -> bytes:
        """The first `limit` bytes written."""
        try:
            return os.pread(self.fd, limit, 0)
        except OSError:
            return b""

    def text(self, limit: int = OUTPUT_ECHO_CHARS) -> str:
        """The start of the output, at most `limit` characters."""
        return self.read(limit * 4).decode("utf-8", "replace")[:limit].strip()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass(slots=True)
class LaunchedApp:
    pid: int
    argv: list[str]
    log: OutputLog
    process: Process | None = None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    def output(self, limit: int = OUTPUT_ECHO_CHARS) -> str:
        """The start of what the program printed, at most `limit` characters."""
        return self.log.text(limit)


class Desktop(abc.ABC):
    """A running X display of one session, and everything started on it."""

    display_name: str
    width: int
    height: int

    @property
    @abc.abstractmethod
    def endpoint(self) -> XEndpoint:
        """How the server connects to this display."""

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

    def describe(self) -> dict[str, Any]:
        """Where the desktop's processes run (tier, uid, limits...), for `list_sessions`."""
        return {}

    def limits_hit(self) -> str:
        """Which of the session's limits were hit so far, for an error message ('' if none)."""
        return ""

    @abc.abstractmethod
    def export(self) -> dict[str, str]:
        """What another session needs to show windows here: display, authority file, socket directory."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop the display and every process on it; never raises; safe to call twice."""


class DisplayProvider(abc.ABC):
    """Makes desktops."""

    @abc.abstractmethod
    async def start(self, spec: DesktopSpec, runner: Runner, paths: HostPaths) -> Desktop:
        """Start a desktop, ready for input and screenshots when this returns.

        Raises:
            BackendError: the display or window manager failed to start.
        """


# -- Xvfb ------------------------------------------------------------------------------


class XvfbDesktop(Desktop):
    """Xvfb plus a window manager, every process owned by the session's `Runner`."""

    def __init__(self, spec: DesktopSpec, runner: Runner, paths: HostPaths, allocator: DisplayAllocator) -> None:
        self.spec = spec
        self.width = spec.width
        self.height = spec.height
        self.runner = runner
        self.paths = paths
        self.allocator = allocator
        self.number: int | None = None
        self.display_name = ""
        self.cookie = new_cookie()
        self.server: Process | None = None
        self.apps: list[LaunchedApp] = []
        self.logs: list[OutputLog] = []
        self.xvfb_log: OutputLog | None = None
        self._closed = False

    @property
    def endpoint(self) -> XEndpoint:
        if self.number is None:
            raise BackendError("this desktop has no display yet")
        return XEndpoint(self.display_name, self.runner.x11_socket(self.number), self.cookie)

    def new_log(self) -> OutputLog:
        """A fresh output file for one program (closed with the desktop)."""
        log = OutputLog(self.paths.home, self.paths.home.parent)
        self.logs.append(log)
        return log

    def app_env(self) -> dict[str, str]:
        """A launched program's whole environment, built from nothing (never the server's)."""
        inside = self.runner.inside
        home = inside.home
        env = {
            "PATH": APP_PATH,
            "HOME": home,
            "DISPLAY": self.display_name,
            "XAUTHORITY": inside.authority,
            "LANG": "C.UTF-8",  # so terminals accept the Unicode `type` sends
            "TMPDIR": inside.tmp,
            "XDG_CONFIG_HOME": f"{home}/.config",
            "XDG_CACHE_HOME": f"{home}/.cache",
            "XDG_DATA_HOME": f"{home}/.local/share",
            "XDG_STATE_HOME": f"{home}/.local/state",
        }
        env.update(self.spec.env)
        return env

    async def launch(self, argv: Sequence[str]) -> LaunchedApp:
        if self._closed:
            raise BackendError("this desktop is closed")
        argv = list(argv)
        if "/" not in argv[0] and shutil.which(argv[0], path=APP_PATH) is None:
            # Inside a sandbox a missing program is only bwrap's exit code 1: say it plainly first.
            raise ParameterError(
                f"program not found: {argv[0][:OUTPUT_ECHO_CHARS]!r}; "
                "give an installed program (e.g. 'xterm') or its full path"
            )
        output = self.new_log()
        try:
            process = await self.runner.spawn(
                argv,
                env=self.app_env(),
                cwd=self.runner.inside.home,
                stdin=subprocess.DEVNULL,
                stdout=output.fd,
                stderr=subprocess.STDOUT,
            )
        except FileNotFoundError:
            raise ParameterError(
                f"program not found: {argv[0][:OUTPUT_ECHO_CHARS]!r}; "
                "give an installed program (e.g. 'xterm') or its full path"
            ) from None
        except PermissionError:
            raise ParameterError(f"program {argv[0][:OUTPUT_ECHO_CHARS]!r} is not executable") from None
        app = LaunchedApp(pid=process.pid, argv=argv, log=output, process=process)
        self.apps.append(app)
        log.info("vm %s: launched %s (pid %d) on %s", self.spec.label, _safe_name(argv[0]), app.pid, self.display_name)
        return app

    def problem(self) -> str | None:
        if self._closed:
            return "this desktop was closed"
        if self.server is None or self.server.returncode is not None:
            code = None if self.server is None else self.server.returncode
            limits = self.runner.limits_hit()
            return (
                f"the X server of this desktop ({self.display_name}) exited (code {code})"
                f"{'; ' + limits if limits else ''}; destroy or reinitialize the vm session to get a new desktop"
            )
        return None

    def limits_hit(self) -> str:
        return self.runner.limits_hit()

    def xvfb_output(self, limit: int) -> str:
        return self.xvfb_log.text(limit) if self.xvfb_log else ""

    def pids(self) -> list[int]:
        return self.runner.pids()

    def describe(self) -> dict[str, Any]:
        return self.runner.describe()

    def export(self) -> dict[str, str]:
        return {
            "display": self.display_name,
            "xauthority": str(self.paths.authority),
            "x11_socket_dir": str(self.endpoint.socket_path.parent),
        }

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self.runner.aclose()
            for output in self.logs:
                output.close()
            await anyio.to_thread.run_sync(self._remove_host_leftovers)
            if self.number is not None:
                self.allocator.release(self.number)
        log.info("vm %s: desktop %s closed", self.spec.label, self.display_name or "(unstarted)")

    def _remove_host_leftovers(self) -> None:
        """Remove the cookie and socket, and a killed host Xvfb's socket in /tmp/.X11-unix.

        The number was free on the host when we took it and stays ours until `aclose`
        releases it, so the host socket of that number is this desktop's.
        """
        for directory in (self.paths.x11_dir, self.paths.xauth_dir):
            shutil.rmtree(directory, ignore_errors=True)
        if not self.runner.sandboxed and self.number is not None and self.server is not None:
            with contextlib.suppress(OSError):
                self.runner.x11_socket(self.number).unlink()


class XvfbProvider(DisplayProvider):
    """Runs Xvfb on a display number the allocator picks, then a window manager."""

    def __init__(self, allocator: DisplayAllocator, *, xvfb: str = "Xvfb", depth: int = 24) -> None:
        self.allocator = allocator
        self.xvfb = xvfb
        self.depth = depth

    async def start(self, spec: DesktopSpec, runner: Runner, paths: HostPaths) -> Desktop:
        desktop = XvfbDesktop(spec, runner, paths, self.allocator)
        try:
            await anyio.to_thread.run_sync(_prepare_files, desktop, runner.uid)
            with anyio.fail_after(spec.start_timeout):
                await self._start_server(desktop)
                if spec.window_manager:
                    await self._start_window_manager(desktop, spec.window_manager)
        except BaseException as exc:
            await desktop.aclose()
            if isinstance(exc, TimeoutError):
                raise BackendError(
                    f"desktop did not start within {spec.start_timeout:g} s "
                    f"({desktop.xvfb_output(OUTPUT_ECHO_CHARS) or 'no output'})"
                ) from exc
            raise
        return desktop

    async def _start_server(self, desktop: XvfbDesktop) -> None:
        avoid: set[int] = set()
        attempts = 1 if desktop.runner.sandboxed else HOST_DISPLAY_ATTEMPTS
        for _ in range(attempts):
            number = self.allocator.take(frozenset(avoid))
            desktop.number = number
            desktop.display_name = f":{number}"
            if await self._run_xvfb(desktop, number):
                if desktop.runner.sandboxed:
                    # Xvfb opens its socket directory to every user (01777, as for /tmp/.X11-unix).
                    # Here others may connect (a linked browser) but never add or remove files.
                    await anyio.Path(desktop.paths.x11_dir).chmod(0o711)
                log.info(
                    "vm %s: Xvfb %s %dx%d pid %d",
                    desktop.spec.label,
                    desktop.display_name,
                    desktop.width,
                    desktop.height,
                    desktop.server.pid if desktop.server else -1,
                )
                return
            output = desktop.xvfb_output(4096)
            self.allocator.release(number)
            desktop.number = None
            if "already active" not in output:
                raise BackendError(f"Xvfb failed to start: {output[:OUTPUT_ECHO_CHARS] or 'no output'}")
            avoid.add(number)  # another program took it between our check and Xvfb's
        raise BackendError(f"Xvfb found no free display after {attempts} tries")

    async def _run_xvfb(self, desktop: XvfbDesktop, number: int) -> bool:
        """Start Xvfb on `number`; True once it listens, False if it exited first."""
        read_fd, write_fd = os.pipe()
        argv = [
            self.xvfb,
            f":{number}",
            "-auth",
            desktop.runner.inside.authority,
            "-displayfd",
            str(write_fd),
            "-screen",
            "0",
            f"{desktop.width}x{desktop.height}x{self.depth}",
            # The server reaches the socket file; no TCP, and no abstract socket, which any
            # process in the same network namespace could reach.
            "-nolisten",
            "tcp",
            "-nolisten",
            "local",
            "-noreset",
            "-dpi",
            "96",
        ]
        desktop.xvfb_log = desktop.new_log()
        try:
            try:
                desktop.server = await desktop.runner.spawn(
                    argv,
                    env={"PATH": APP_PATH, "HOME": desktop.runner.inside.home, "LANG": "C.UTF-8"},
                    cwd=desktop.runner.inside.home,
                    stdin=subprocess.DEVNULL,
                    stdout=desktop.xvfb_log.fd,
                    stderr=subprocess.STDOUT,
                    pass_fds=(write_fd,),
                )
            except FileNotFoundError:
                raise BackendError(f"{self.xvfb} is not installed (apt-get install xvfb openbox)") from None
            os.close(write_fd)
            write_fd = -1
            answered = await _read_display_number(read_fd)
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
        if answered is None:
            with anyio.move_on_after(2):
                await desktop.server.wait()
            return False
        if answered != number:
            raise BackendError(f"Xvfb took display :{answered}, not :{number}")
        return True

    async def _start_window_manager(self, desktop: XvfbDesktop, name: str) -> None:
        argv = WINDOW_MANAGERS.get(name, [name])
        try:
            app = await desktop.launch(argv)
        except ParameterError as exc:
            raise BackendError(f"window manager {name!r} is not installed ({exc.message})") from None
        # Windows opened before the WM owns the screen get no focus: wait until it does.
        conn = await anyio.to_thread.run_sync(open_display, desktop.endpoint)
        try:
            while not await anyio.to_thread.run_sync(_wm_ready, conn):
                if app.returncode is not None:
                    raise BackendError(f"window manager {name!r} exited: {app.output() or 'no output'}")
                await anyio.sleep(0.01)
        finally:
            conn.close()


def prepare_dirs(paths: HostPaths) -> None:
    """The session's directories the server writes (made before a sandbox binds them)."""
    for directory in (paths.x11_dir, paths.xauth_dir):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def _prepare_files(desktop: XvfbDesktop, uid: int | None) -> None:
    """The X socket directory and authority file, given to the session; a host desktop's home dirs."""
    paths = desktop.paths
    prepare_dirs(paths)
    if not desktop.runner.sandboxed:
        # A sandbox's home is its own (capped, owned by its uid); apps make what they need there.
        for sub in (".config", ".cache", ".local/share", ".local/state"):
            (paths.home / sub).mkdir(parents=True, exist_ok=True)
    # Xvfb inside a sandbox runs as the session's uid: it creates its socket here and reads
    # the cookie. Both directories sit in the session's scratch, which only the server may
    # walk (0700), so the open modes below reach exactly the sandboxes these directories
    # are bound into: this session's, and a linked browser session's (`export`), whose uid
    # is another one.
    give_to(paths.x11_dir, uid, 0o700)
    give_to(paths.xauth_dir, uid, 0o711)
    write_authority(paths.authority, desktop_entries(desktop.cookie, desktop.runner.hostname), mode=0o644)
    if uid is not None:
        os.chown(paths.authority, uid, uid)


def _safe_name(program: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(program).name)[:40] or "program"


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
