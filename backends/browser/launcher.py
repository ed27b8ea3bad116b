"""The shared Chromium: one Playwright driver, one headless browser, launched and relaunched here.

`Launcher` owns everything process-level of the browser backend: the Playwright driver
(a Node process), one headless Chromium shared by every session, and one headed Chromium
per X display for sessions that ask for `headless=false`. Each Chromium is started with
`AGENTFLOW_SESSION=<tag>` in its environment (a new tag per launch), so `close()` can
sweep every process it ever started, crash handlers and zygotes included.

A crash (the browser process dies) marks its `BrowserHandle` dead; sessions holding that
handle then fail their health check, and the next `browser()` call launches a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from playwright.async_api import Browser, Playwright, async_playwright
from playwright.async_api import Error as PlaywrightError

from backends.processes import kill_pids, make_scratch_dir, pids_with_marker, session_env
from session.errors import BackendError

from .config import CHROMIUM_ARGS, LaunchSettings

log = logging.getLogger(__name__)


@dataclass(eq=False)
class BrowserHandle:
    """One launched Chromium. `dead` turns true when it disconnects (crash or close)."""

    browser: Browser
    tag: str
    display: str | None
    generation: int
    dead: bool = False
    crashed: bool = False
    contexts: int = 0
    closing: bool = field(default=False, repr=False)

    @property
    def alive(self) -> bool:
        return not self.dead and self.browser.is_connected()


class Launcher:
    """Starts, relaunches and stops the backend's Chromium processes."""

    def __init__(self, settings: LaunchSettings) -> None:
        self.settings = settings
        self.tag_prefix = f"browser-{uuid.uuid4().hex[:8]}"
        self.tags: list[str] = []
        self._playwright: Playwright | None = None
        self._handles: dict[str | None, BrowserHandle] = {}
        self._lock = asyncio.Lock()
        self._generation = 0
        self._home: Path | None = None
        self._profiles: dict[str, str | None] = {}

    # -- public ------------------------------------------------------------------------

    async def browser(self, display: str | None = None) -> BrowserHandle:
        """The live browser for `display` (None: the shared headless one), launched if needed.

        Raises:
            BackendError: Chromium could not be started.
        """
        handle = self._handles.get(display)
        if handle is not None and handle.alive:
            return handle
        async with self._lock:
            handle = self._handles.get(display)
            if handle is not None and handle.alive:
                return handle
            if handle is not None:
                log.warning("browser %s (display %s) is gone; relaunching", handle.tag, display)
                await self._sweep(handle.tag)
            handle = await self._launch(display)
            self._handles[display] = handle
            return handle

    def current(self, display: str | None = None) -> BrowserHandle | None:
        return self._handles.get(display)

    def pids(self) -> list[int]:
        """Every live process of every Chromium this launcher started."""
        return sorted({pid for tag in self.tags for pid in self.pids_of(tag)})

    def pids_of(self, tag: str) -> list[int]:
        """Live processes of the one Chromium launched with marker `tag`."""
        return chromium_pids(tag, self._profiles.get(tag))

    async def release(self, handle: BrowserHandle) -> None:
        """A context of `handle` closed; a headed browser nobody uses any more is closed too."""
        handle.contexts = max(0, handle.contexts - 1)
        if handle.display is None or handle.contexts or handle.closing:
            return
        async with self._lock:
            if handle.contexts == 0 and self._handles.get(handle.display) is handle:
                del self._handles[handle.display]
                await self._close_handle(handle)

    async def close(self) -> None:
        """Close every browser and the driver; leave no process behind. Never raises."""
        async with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
            for handle in handles:
                await self._close_handle(handle)
            if self._playwright is not None:
                with contextlib.suppress(Exception):
                    with anyio.fail_after(10):
                        await self._playwright.stop()
                self._playwright = None
            for tag in self.tags:
                await self._sweep(tag)
            if self._home is not None:
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(self._home, ignore_errors=True))
                self._home = None

    # -- internals ---------------------------------------------------------------------

    async def _driver(self, restart: bool = False) -> Playwright:
        if restart and self._playwright is not None:
            with contextlib.suppress(Exception):
                await self._playwright.stop()
            self._playwright = None
        if self._playwright is None:
            self._playwright = await async_playwright().start()
        return self._playwright

    def _env(self, tag: str, display: str | None) -> dict[str, str]:
        if self._home is None:
            self._home = make_scratch_dir(f"agentflow-{self.tag_prefix}-")
        home = str(self._home)
        env = session_env(tag, HOME=home, XDG_CONFIG_HOME=f"{home}/.config", XDG_CACHE_HOME=f"{home}/.cache")
        env.pop("DISPLAY", None)
        if display is not None:
            env["DISPLAY"] = display
        return env

    async def _launch(self, display: str | None) -> BrowserHandle:
        self._generation += 1
        tag = f"{self.tag_prefix}.{self._generation}"
        self.tags.append(tag)
        options = {
            "executable_path": self.settings.executable_path,
            "headless": display is None,
            "args": [*CHROMIUM_ARGS, *self.settings.launch_args],
            "env": self._env(tag, display),
            "timeout": self.settings.launch_timeout_ms,
        }
        if not await anyio.Path(self.settings.executable_path).exists():
            raise BackendError(
                f"Chromium not found at {self.settings.executable_path}: install it "
                "(`apt-get install chromium`) or set resources.browser.config.executable_path in the manifest"
            )
        try:
            driver = await self._driver()
            try:
                browser = await driver.chromium.launch(**options)
            except PlaywrightError as exc:
                if "closed" not in exc.message.lower():
                    raise
                # The driver itself died (killed with the browser?): start a new one, once.
                driver = await self._driver(restart=True)
                browser = await driver.chromium.launch(**options)
        except PlaywrightError as exc:
            await self._sweep(tag)
            first = exc.message.splitlines()[0] if exc.message else repr(exc)
            raise BackendError(f"could not launch Chromium ({self.settings.executable_path}): {first}") from exc
        self._profiles[tag] = await anyio.to_thread.run_sync(_profile_dir, tag)
        handle = BrowserHandle(browser=browser, tag=tag, display=display, generation=self._generation)
        browser.on("disconnected", lambda _b: self._on_disconnected(handle))
        log.info("launched Chromium %s (%s)", tag, f"display {display}" if display else "headless")
        return handle

    def _on_disconnected(self, handle: BrowserHandle) -> None:
        handle.dead = True
        if not handle.closing:
            handle.crashed = True
            log.warning("Chromium %s disconnected unexpectedly (crashed or killed)", handle.tag)

    async def _close_handle(self, handle: BrowserHandle) -> None:
        handle.closing = True
        if handle.browser.is_connected():
            with contextlib.suppress(Exception):
                with anyio.fail_after(10):
                    await handle.browser.close()
        handle.dead = True
        await self._sweep(handle.tag)

    async def _sweep(self, tag: str) -> None:
        """Kill whatever still carries `tag` (crash handlers, orphaned renderers) and wait for it."""
        profile = self._profiles.get(tag)
        pids: list[int] = []
        for _ in range(50):
            pids = await anyio.to_thread.run_sync(chromium_pids, tag, profile)
            if not pids:
                return
            kill_pids(pids)
            await anyio.sleep(0.02)
        log.error("processes of %s survive SIGKILL: %s", tag, pids)


def chromium_pids(tag: str, profile: str | None) -> list[int]:
    """Live processes of one launched Chromium: those carrying the marker `tag`, plus those
    whose command line names its profile directory.

    The marker alone is not enough: Chromium's child processes (zygotes, renderers, GPU,
    utilities) rewrite their process title over the argv/environ area and zero the rest, so
    /proc/<pid>/environ no longer shows `AGENTFLOW_SESSION`. Every one of them carries
    `--user-data-dir=<the launch's unique temporary profile>` on its command line.
    """
    return pids_with_marker(tag, cmdline_token=f"--user-data-dir={profile}" if profile else None)


def _profile_dir(tag: str) -> str | None:
    """The `--user-data-dir` Playwright gave the Chromium launched with marker `tag`."""
    for pid in pids_with_marker(tag):
        with contextlib.suppress(OSError):
            words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            for word in words:
                if word.startswith(b"--user-data-dir="):
                    return word.split(b"=", 1)[1].decode(errors="replace")
    log.warning("could not find the profile directory of Chromium %s", tag)
    return None


def process_tree_pss_kb(pids: list[int]) -> int:
    """Sum of PSS (kB) over `pids`, from /proc/<pid>/smaps_rollup (0 for vanished ones)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return total


__all__ = ["BrowserHandle", "Launcher", "chromium_pids", "process_tree_pss_kb"]
