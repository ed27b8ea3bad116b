"""The shared Chromium: one Playwright driver, one sandboxed browser, launched and relaunched here.

`Launcher` owns everything process-level of the browser backend: the Playwright driver
(a Node process speaking to us over pipes), one headless Chromium shared by every
session, one headed Chromium per linked vm desktop, and the egress proxy their pages go
through (served on a thread of its own, see `proxy.py`). Every Chromium runs confined
(`sandbox.py`) unless the operator's policy says `isolation = "none"`.

Failures are survived, not fatal: a Chromium that dies marks its `BrowserHandle` dead; a
Playwright driver that dies marks every handle it launched dead. Sessions holding a dead
handle fail their health check (1003, asking to reinitialize) and the next `browser()`
call starts what is missing (driver, browser) again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import psutil
from anyio.abc import SocketListener
from playwright.async_api import Browser, Playwright, async_playwright
from playwright.async_api import Error as PlaywrightError

from backends.browser import seccomp
from backends.browser.models import CHROMIUM_ARGS, BrowserSettings
from backends.browser.proxy import EgressProxy
from backends.browser.sandbox import (
    NETNS_PROXY_PORT,
    SandboxPlan,
    can_confine,
    check_traversable,
    listen_in_netns,
    prepare,
    sandbox_child_pid,
)
from backends.processes import descendants, kill_pids, pids_with_marker, session_env
from session.errors import BackendError, ConfigurationError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Display:
    """A linked vm desktop a headed browser shows on (from the vm session's export)."""

    display: str
    xauthority: Path | None
    x11_socket_dir: Path | None

    @property
    def key(self) -> str:
        return f"{self.x11_socket_dir}|{self.display}"


@dataclass(eq=False)
class BrowserHandle:
    """One launched Chromium. `dead` turns true when it or its driver goes away."""

    browser: Browser
    tag: str
    display: Display | None
    generation: int
    driver_generation: int
    proxy_server: str
    plan: SandboxPlan | None
    dead: bool = False
    crashed: bool = False
    contexts: int = 0
    closing: bool = field(default=False, repr=False)
    serving: Future[Any] | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return not self.dead and self.browser.is_connected()


class Launcher:
    """Starts, relaunches and stops the backend's driver, Chromium processes and egress proxy."""

    def __init__(self, settings: BrowserSettings, scratch_root: Path, *, confine: bool, proxy: EgressProxy) -> None:
        self.settings = settings
        self.confine = confine
        self.proxy = proxy
        self.root = scratch_root / f"browser-{uuid.uuid4().hex[:8]}"
        self.tag_prefix = f"browser-{self.root.name.rsplit('-', 1)[1]}"
        self.tags: list[str] = []
        self.driver_pids: list[int] = []
        self._playwright: Playwright | None = None
        self._driver_generation = 0
        self._handles: dict[str | None, BrowserHandle] = {}
        self._lock = anyio.Lock()
        self._generation = 0
        self._profiles: dict[str, str | None] = {}
        self._portal_cm: Any = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._host_listener: Future[Any] | None = None
        self._host_proxy: str | None = None

    @property
    def own_network(self) -> bool:
        """Whether Chromium gets a network namespace of its own (only the proxy inside)."""
        return self.confine and can_confine()

    # -- public ------------------------------------------------------------------------

    async def browser(self, display: Display | None = None) -> BrowserHandle:
        """The live browser for `display` (None: the shared headless one), launched if needed.

        Raises:
            BackendError: Chromium could not be started.
        """
        key = display.key if display else None
        handle = self._handles.get(key)
        if handle is not None and self.handle_alive(handle):
            return handle
        async with self._lock:
            handle = self._handles.get(key)
            if handle is not None and self.handle_alive(handle):
                return handle
            if handle is not None:
                log.warning("browser %s is gone; relaunching", handle.tag)
                handle.dead = True
                await self._close_handle(handle)
            handle = await self._launch(display)
            self._handles[key] = handle
            return handle

    def handle_alive(self, handle: BrowserHandle) -> bool:
        """Whether `handle`'s Chromium and the driver it was launched by are both still there."""
        if handle.dead:
            return False
        if handle.driver_generation != self._driver_generation or not self._driver_alive():
            handle.dead = handle.crashed = True
            return False
        return handle.alive

    def pids(self) -> list[int]:
        """Every live process of every Chromium this launcher started (sandbox wrappers included)."""
        return sorted({pid for tag in self.tags for pid in self.pids_of(tag)})

    def pids_of(self, tag: str) -> list[int]:
        """Live processes of the one Chromium launched with marker `tag`."""
        profile = self._profiles.get(tag)
        found = set(pids_with_marker(tag, cmdline_token=f"--user-data-dir={profile}" if profile else None))
        # Renderers and zygotes rewrite their command line and environ (process title), so
        # the marker is gone from them: they are found as descendants of the tagged ones.
        for pid in list(found):
            found.update(descendants(pid))
        return sorted(found)

    def profile_of(self, handle: BrowserHandle) -> str | None:
        """The profile directory (`--user-data-dir`) of `handle`'s Chromium, if known."""
        return self._profiles.get(handle.tag)

    def live_driver_pids(self) -> list[int]:
        return [pid for pid in self.driver_pids if _running(pid)]

    async def release(self, handle: BrowserHandle) -> None:
        """A context of `handle` closed; a headed browser nobody uses any more is closed too."""
        handle.contexts = max(0, handle.contexts - 1)
        if handle.display is None or handle.contexts or handle.closing:
            return
        async with self._lock:
            if handle.contexts == 0 and self._handles.get(handle.display.key) is handle:
                del self._handles[handle.display.key]
                await self._close_handle(handle)

    async def close(self) -> None:
        """Close every browser, the driver and the proxy; leave no process behind. Never raises."""
        with anyio.CancelScope(shield=True):
            async with self._lock:
                handles = list(self._handles.values())
                self._handles.clear()
                for handle in handles:
                    await self._close_handle(handle)
                await self._stop_driver()
                for tag in self.tags:
                    await self._sweep(tag)
                await anyio.to_thread.run_sync(self._stop_portal)
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(self.root, ignore_errors=True))

    # -- the driver --------------------------------------------------------------------

    def _driver_alive(self) -> bool:
        if self._playwright is None:
            return False
        # Playwright has no public "driver died" signal: its connection records the close.
        impl = getattr(self._playwright, "_impl_obj", None)
        connection = getattr(impl, "_connection", None)
        if getattr(connection, "_closed_error", None) is not None:
            return False
        return not self.driver_pids or _running(self.driver_pids[-1])

    async def _driver(self) -> Playwright:
        if self._playwright is not None and not self._driver_alive():
            log.warning("the Playwright driver is gone; starting a new one")
            await self._stop_driver()
        if self._playwright is None:
            before = await anyio.to_thread.run_sync(_driver_children)
            manager = async_playwright()
            self._playwright = await manager.start()
            _observe_driver_error(manager)
            self._driver_generation += 1
            pid = _driver_pid(manager)
            if pid is None:  # Playwright changed its internals: the new run-driver child it is
                new = await anyio.to_thread.run_sync(_driver_children)
                pid = min(new - before) if new - before else None
            if pid is not None:
                self.driver_pids.append(pid)
            else:
                log.warning("could not find the Playwright driver's pid; its death is noticed on the next call")
        return self._playwright

    async def _stop_driver(self) -> None:
        playwright, self._playwright = self._playwright, None
        if playwright is not None:
            with contextlib.suppress(Exception), anyio.move_on_after(10):
                await playwright.stop()
        live = self.live_driver_pids()
        kill_pids(live)

    # -- the proxy ---------------------------------------------------------------------

    def _start_portal(self) -> anyio.from_thread.BlockingPortal:
        if self._portal is None:
            self._portal_cm = anyio.from_thread.start_blocking_portal()
            self._portal = self._portal_cm.__enter__()
        return self._portal

    def _stop_portal(self) -> None:
        if self._portal is None:
            return
        if self._host_listener is not None:
            self._host_listener.cancel()
        self._host_listener = self._host_proxy = None
        with contextlib.suppress(Exception):
            self._portal.call(self._portal.stop, True)
        with contextlib.suppress(Exception):
            self._portal_cm.__exit__(None, None, None)
        self._portal = self._portal_cm = None

    async def _serve(self, sock: socket.socket) -> None:
        listener = await SocketListener.from_socket(sock)
        async with listener:
            await self.proxy.serve(listener)

    def _serve_on(self, sock: socket.socket) -> Future[Any]:
        return self._start_portal().start_task_soon(self._serve, sock)

    async def _host_proxy_server(self) -> str:
        """The proxy on the host's loopback (when Chromium shares the host's network)."""
        if self._host_proxy is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            sock.setblocking(False)
            port = sock.getsockname()[1]
            self._host_listener = await anyio.to_thread.run_sync(self._serve_on, sock)
            self._host_proxy = f"http://127.0.0.1:{port}"
        return self._host_proxy

    # -- launching ---------------------------------------------------------------------

    async def _launch(self, display: Display | None) -> BrowserHandle:
        if not await anyio.Path(self.settings.executable_path).exists():
            raise BackendError(
                f"Chromium not found at {self.settings.executable_path}: install it "
                "(`apt-get install chromium`) or set resources.browser.settings.executable_path in the manifest"
            )
        self._generation += 1
        tag = f"{self.tag_prefix}.{self._generation}"
        self.tags.append(tag)
        launch_dir = self.root / f"launch-{self._generation}"
        own_network = self.own_network
        proxy_server = f"http://127.0.0.1:{NETNS_PROXY_PORT}" if own_network else await self._host_proxy_server()
        plan: SandboxPlan | None = None
        executable = self.settings.executable_path
        downloads: Path | None = None
        if self.confine:
            await anyio.to_thread.run_sync(_make_root, self.root)
            x11_dir = display.x11_socket_dir if display else None
            if display is not None and x11_dir is not None:
                x11_dir = await anyio.to_thread.run_sync(_link_x11_socket, display, x11_dir, launch_dir / "x11")
            plan = SandboxPlan(
                launch_dir=launch_dir,
                uid=self.settings.browser_uid if can_confine() else None,
                own_network=own_network,
                executable=self.settings.executable_path,
                tag=tag,
                seccomp=seccomp.supported(),
                display=display.display if display else None,
                xauthority=launch_dir / "Xauthority" if display and display.xauthority else None,
                x11_socket_dir=x11_dir,
            )
            if plan.uid is not None:
                try:
                    await anyio.to_thread.run_sync(check_traversable, launch_dir)
                    if plan.x11_socket_dir is not None:
                        await anyio.to_thread.run_sync(check_traversable, plan.x11_socket_dir / "X")
                except OSError as exc:
                    raise BackendError(f"cannot sandbox the browser: {exc}") from exc
            executable = str(await anyio.to_thread.run_sync(prepare, plan))
            if display and display.xauthority and plan.xauthority:
                await anyio.to_thread.run_sync(_copy_owned, display.xauthority, plan.xauthority, plan.uid)
            downloads = plan.downloads
        else:
            await anyio.Path(launch_dir).mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0 and (plan is None or plan.uid is None):
            # Chromium's own sandbox refuses to run as root; the backend refuses this at start,
            # and this keeps any other path from falling back to `--no-sandbox`.
            raise ConfigurationError("Chromium would run as root, where its own sandbox cannot run; refusing")
        options: dict[str, Any] = {
            "executable_path": executable,
            "headless": display is None,
            # Never `--no-sandbox` (Playwright adds it unless told otherwise).
            "chromium_sandbox": True,
            "args": [
                *CHROMIUM_ARGS,
                f"--proxy-server={proxy_server}",
                "--proxy-bypass-list=<-loopback>",
                *self.settings.launch_args,
            ],
            "env": self._env(tag, display, launch_dir),
            "timeout": self.settings.launch_timeout * 1000,
        }
        if downloads is not None:
            options["downloads_path"] = str(downloads)
        try:
            driver = await self._driver()
            browser = await driver.chromium.launch(**options)
        except PlaywrightError as exc:
            await self._sweep(tag)
            lines = (exc.message or repr(exc)).splitlines()
            # The browser's (or the sandbox wrapper's) own complaint says more than Playwright's summary.
            said = [line.split("[err]", 1)[1].strip() for line in lines if "[err]" in line]
            reason = (said[0] if said else lines[0])[:300]
            raise BackendError(f"could not launch Chromium ({self.settings.executable_path}): {reason}") from exc
        handle = BrowserHandle(
            browser=browser,
            tag=tag,
            display=display,
            generation=self._generation,
            driver_generation=self._driver_generation,
            proxy_server=proxy_server,
            plan=plan,
        )
        browser.on("disconnected", lambda _b: self._on_disconnected(handle))
        try:
            if own_network and plan is not None:
                handle.serving = await self._serve_in_sandbox(plan)
            self._profiles[tag] = await anyio.to_thread.run_sync(_profile_dir, tag)
        except BaseException:
            await self._close_handle(handle)
            raise
        log.info(
            "launched Chromium %s (%s, %s)",
            tag,
            f"display {display.display}" if display else "headless",
            "sandboxed" if plan else "unconfined",
        )
        return handle

    async def _serve_in_sandbox(self, plan: SandboxPlan) -> Future[Any]:
        pid = await anyio.to_thread.run_sync(sandbox_child_pid, plan)
        if pid is None:
            raise BackendError("the browser sandbox did not report its process; cannot attach the egress proxy")
        try:
            sock = await anyio.to_thread.run_sync(listen_in_netns, pid, "127.0.0.1", NETNS_PROXY_PORT)
        except OSError as exc:
            raise BackendError(f"cannot attach the egress proxy to the browser sandbox: {exc}") from exc
        return await anyio.to_thread.run_sync(self._serve_on, sock)

    def _env(self, tag: str, display: Display | None, launch_dir: Path) -> dict[str, str]:
        home = str(launch_dir / "home")
        env = session_env(tag, HOME=home, XDG_CONFIG_HOME=f"{home}/.config", XDG_CACHE_HOME=f"{home}/.cache")
        env.pop("DISPLAY", None)
        env.pop("XAUTHORITY", None)
        if display is not None:
            env["DISPLAY"] = display.display
            if display.xauthority is not None:
                env["XAUTHORITY"] = str(display.xauthority)
        return env

    def _on_disconnected(self, handle: BrowserHandle) -> None:
        handle.dead = True
        if not handle.closing:
            handle.crashed = True
            log.warning("Chromium %s disconnected unexpectedly (crashed or killed)", handle.tag)

    async def _close_handle(self, handle: BrowserHandle) -> None:
        handle.closing = True
        if handle.browser.is_connected() and self._driver_alive():
            with contextlib.suppress(Exception), anyio.move_on_after(10):
                await handle.browser.close()
        handle.dead = True
        if handle.serving is not None:
            handle.serving.cancel()
        await self._sweep(handle.tag)
        if handle.plan is not None:
            launch_dir = handle.plan.launch_dir
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(launch_dir, ignore_errors=True))

    async def _sweep(self, tag: str) -> None:
        """Kill whatever still carries `tag` (crash handlers, orphaned renderers) and wait for it."""
        pids: list[int] = []
        for _ in range(100):
            pids = await anyio.to_thread.run_sync(self.pids_of, tag)
            if not pids:
                return
            kill_pids(pids)
            await anyio.sleep(0.02)
        log.error("processes of %s survive SIGKILL: %s", tag, pids)


def _make_root(root: Path) -> None:
    """The launcher's directory: root-owned, others may pass through to their launch dir only."""
    root.mkdir(mode=0o711, parents=True, exist_ok=True)
    root.chmod(0o711)


def _link_x11_socket(display: Display, source_dir: Path, target_dir: Path) -> Path:
    """A directory holding only this desktop's X socket, reachable by the browser uid.

    The vm session's socket directory is private to that session; a hard link to the socket
    (root may make one; connecting needs only the socket's own permissions) in the browser's
    launch dir exposes exactly one display and nothing else of that directory. Falls back to
    the directory itself when the link cannot be made (another filesystem).
    """
    number = display.display.lstrip(":").split(".", 1)[0]
    target_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        os.link(source_dir / f"X{number}", target_dir / f"X{number}")
    except OSError as exc:
        log.warning("cannot link the X socket of display %s (%s); binding its directory", display.display, exc)
        return source_dir
    return target_dir


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _driver_transport(manager: Any) -> Any:
    """Playwright's pipe to its driver, from its internals (no public API); None if they moved."""
    return getattr(getattr(manager, "_client", None), "_transport", None)


def _driver_pid(manager: Any) -> int | None:
    """The driver's pid from Playwright's internals; None if they moved."""
    pid = getattr(getattr(_driver_transport(manager), "_proc", None), "pid", None)
    return pid if isinstance(pid, int) else None


def _observe_driver_error(manager: Any) -> None:
    """Playwright awaits its driver pipe's error future only while starting: a driver that dies
    later leaves "Connection closed while reading from the driver" in it unobserved, and asyncio
    reports that as "Future exception was never retrieved" whenever the future is collected
    (at the latest, at exit). Observe it; the death itself is noticed by `_driver_alive`."""
    future = getattr(_driver_transport(manager), "on_error_future", None)
    if isinstance(future, asyncio.Future):
        future.add_done_callback(lambda done: done.cancelled() or done.exception())


def _driver_children() -> set[int]:
    """Our child processes running a Playwright driver (`run-driver`)."""
    found = set()
    for child in psutil.Process().children():
        try:
            if "run-driver" in child.cmdline():
                found.add(child.pid)
        except psutil.Error:
            continue
    return found


def _copy_owned(source: Path, target: Path, uid: int | None) -> None:
    """Copy an X authority file for the browser uid (the vm's copy is the server's, mode 0600)."""
    shutil.copyfile(source, target)
    target.chmod(0o600)
    if uid is not None:
        os.chown(target, uid, uid)


def _profile_dir(tag: str) -> str | None:
    """The `--user-data-dir` Playwright gave the Chromium launched with marker `tag`."""
    for pid in pids_with_marker(tag):
        try:
            words = psutil.Process(pid).cmdline()
        except psutil.Error:
            continue
        for word in words:
            if word.startswith("--user-data-dir="):
                return word.split("=", 1)[1]
    log.warning("could not find the profile directory of Chromium %s", tag)
    return None
