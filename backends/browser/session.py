"""One session's slice of the shared browser: a context, its tabs, console and downloads.

`BrowserSession` is the state `initialize` returns. It follows the context's events (new
tabs, closed tabs, console messages, page errors, dialogs, downloads) so tools only read
it. Everything here belongs to one session; nothing is shared with other sessions.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import posixpath
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
from playwright.async_api import BrowserContext, ConsoleMessage, Dialog, Download, Page, Route

from backends.browser.launcher import BrowserHandle, Launcher
from backends.browser.models import BrowserConfig
from backends.browser.proxy import Grant
from session.errors import BackendError, SessionError

log = logging.getLogger(__name__)


def is_private_file(url: str, private_paths: tuple[str, ...]) -> bool:
    """Whether a file:// URL points into one of `private_paths` (or /proc, which leads anywhere)."""
    path = posixpath.normpath(unquote(urlsplit(url).path) or "/")
    roots = (*private_paths, "/proc")
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


CONSOLE_KEEP = 300
MESSAGE_CHARS = 2_000


@dataclass(eq=False)
class BrowserSession:
    """State of one browser session (what tools see as `ctx.state`)."""

    label: str
    config: BrowserConfig
    launcher: Launcher
    handle: BrowserHandle
    context: BrowserContext
    download_dir: Path
    grant: Grant
    pages: list[Page] = field(default_factory=list)
    active: int = 0
    console: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=CONSOLE_KEEP))
    console_seen: int = 0
    downloads: list[dict[str, Any]] = field(default_factory=list)
    crashed_pages: set[int] = field(default_factory=set)
    context_closed: bool = False
    closed: bool = False
    blocked: re.Pattern[str] | None = None
    allow_file_urls: bool = False
    tab_opened: anyio.Event = field(default_factory=anyio.Event, repr=False)

    # -- wiring ------------------------------------------------------------------------

    async def wire(self, private_paths: tuple[str, ...] = ()) -> None:
        """Follow the context's events and install URL blocking. Call once, before opening a page.

        `private_paths`: with file URLs allowed, directories no page may read through file://
        (the shared browser's own profile and launch dirs, where other sessions' downloads land).
        Routes see every request (links, iframes, subresources), not only `navigate`'s.
        """
        self.context.on("page", self.adopt)
        self.context.on("close", lambda _c: self._on_context_close())
        if self.config.block:
            patterns = [p.strip() for p in self.config.block if p.strip()]
            self.blocked = re.compile("|".join(fnmatch.translate(p) for p in patterns))
        if self.blocked is None and not private_paths:
            return
        blocked = self.blocked

        async def route(route: Route) -> None:
            url = route.request.url
            if blocked is not None and blocked.match(url):
                await route.abort("blockedbyclient")
            elif private_paths and url.startswith("file:") and is_private_file(url, private_paths):
                await route.abort("accessdenied")
            else:
                await route.fallback()

        await self.context.route("**/*", route)

    def adopt(self, page: Page) -> None:
        """Track a tab (opened by us, by a link with target=_blank, or by window.open); make it active."""
        if page in self.pages:
            return
        self.pages.append(page)
        self.active = len(self.pages) - 1
        self.tab_opened.set()
        page.on("console", lambda msg: self._on_console(page, msg))
        page.on("pageerror", lambda err: self._log(page, "pageerror", str(err)))
        page.on("crash", lambda p: self._on_crash(p))
        page.on("close", lambda p: self._on_page_close(p))

        # Playwright runs coroutine handlers as tasks of its own; they end with the context.
        async def on_dialog(dialog: Dialog) -> None:
            await self._on_dialog(page, dialog)

        async def on_download(download: Download) -> None:
            await self._on_download(page, download)

        page.on("dialog", on_dialog)
        page.on("download", on_download)

    def expect_tab(self) -> anyio.Event:
        """A fresh event that the next tab opened in this session sets."""
        self.tab_opened = anyio.Event()
        return self.tab_opened

    # -- what tools use ----------------------------------------------------------------

    def check_alive(self) -> None:
        """Raise `SessionError` (1003) if this session's context can no longer be used."""
        problem = self.problem()
        if problem:
            raise SessionError(problem)

    def problem(self) -> str | None:
        if self.closed:
            return "this browser session was closed; create a new one"
        if self.handle.crashed or not self.launcher.handle_alive(self.handle):
            return (
                "the shared browser (or its Playwright driver) stopped and is restarted on next use; this "
                "session's tabs, cookies and storage are lost. Reinitialize this session (or destroy it and "
                "create a new one)"
            )
        if self.context_closed:
            return (
                "this session's browser context was closed unexpectedly; reinitialize this session "
                "(or destroy it and create a new one)"
            )
        return None

    async def page(self) -> Page:
        """The active tab (a fresh blank one if every tab was closed)."""
        self.check_alive()
        if not self.pages:
            await self.new_page()
        page = self.pages[self.active]
        if id(page) in self.crashed_pages:
            raise BackendError("the active tab's renderer crashed; call reload, or close it with tabs(action='close')")
        return page

    async def new_page(self) -> Page:
        page = await self.context.new_page()
        self.adopt(page)
        self.active = self.pages.index(page)
        return page

    def is_blocked(self, url: str) -> bool:
        return self.blocked is not None and self.blocked.match(url) is not None

    def recent_console(self, limit: int, clear: bool) -> tuple[list[dict[str, Any]], int]:
        items = list(self.console)[-limit:] if limit else []
        dropped = max(0, self.console_seen - len(self.console))
        if clear:
            self.console.clear()
        return items, dropped

    async def close(self) -> None:
        """Close every tab and the context. Never raises."""
        self.closed = True
        if not self.context_closed and self.launcher.handle_alive(self.handle):
            with contextlib.suppress(Exception), anyio.move_on_after(10):
                await self.context.close()
        self.pages.clear()

    # -- event handlers ----------------------------------------------------------------

    def _log(self, page: Page, kind: str, text: str, **extra: Any) -> None:
        self.console_seen += 1
        entry = {"type": kind, "text": text[:MESSAGE_CHARS], "url": page.url[:500], "time": round(time.time(), 3)}
        entry.update(extra)
        self.console.append(entry)

    def _on_console(self, page: Page, msg: ConsoleMessage) -> None:
        location = msg.location or {}
        where = f"{location.get('url', '')}:{location.get('lineNumber', 0)}" if location.get("url") else None
        self._log(page, msg.type, msg.text, **({"source": where} if where else {}))

    def _on_crash(self, page: Page) -> None:
        self.crashed_pages.add(id(page))
        self._log(page, "crash", "the tab's renderer process crashed")

    def _on_page_close(self, page: Page) -> None:
        self.crashed_pages.discard(id(page))
        if page not in self.pages:
            return
        index = self.pages.index(page)
        self.pages.remove(page)
        if self.active >= index and self.active > 0:
            self.active -= 1

    def _on_context_close(self) -> None:
        self.context_closed = True

    async def _on_dialog(self, page: Page, dialog: Dialog) -> None:
        self._log(page, "dialog", f"{dialog.type}: {dialog.message}", handled=self.config.dialogs)
        if self.config.dialogs == "accept":
            await dialog.accept()
        else:
            await dialog.dismiss()

    async def _on_download(self, page: Page, download: Download) -> None:
        name = Path(download.suggested_filename).name or "download"
        target = self.download_dir / name
        stem, suffix, n = target.stem, target.suffix, 1
        while await anyio.Path(target).exists():
            target = self.download_dir / f"{stem} ({n}){suffix}"
            n += 1
        entry: dict[str, Any] = {"file": target.name, "path": str(target), "url": download.url}
        try:
            await download.save_as(target)
            entry["size"] = (await anyio.Path(target).stat()).st_size
        except Exception as exc:  # the download failed or was cancelled: say so, keep going
            entry["error"] = (str(exc).splitlines() or ["failed"])[0][:300]
        self.downloads.append(entry)
        self._log(page, "download", f"downloaded {download.url} -> {target.name}")
