"""The `browser` backend: one shared Chromium, a private browser context per session.

Hybrid lifecycle: `warmup`/`shutdown` start and stop the shared browser (`Launcher`),
`initialize`/`cleanup` open and close one session's context (`BrowserSession`). Tools
act on the session's active tab and point at elements by the refs of `snapshot`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, ClassVar

import anyio
from playwright.async_api import Error as PlaywrightError

from backends.base import Backend, Image, SessionInfo, ToolContext, ToolResult, tool
from backends.processes import make_scratch_dir
from session.errors import BackendError, ExecutionTimeout, ParameterError

from . import snapshot
from .args import (
    ClickArgs,
    ConsoleArgs,
    EvaluateArgs,
    GetTextArgs,
    HoverArgs,
    NavigateArgs,
    PressArgs,
    ScreenshotArgs,
    ScrollArgs,
    SelectOptionArgs,
    SnapshotArgs,
    TabsArgs,
    TypeArgs,
    WaitForArgs,
)
from .capture import capture
from .config import BrowserConfig, LaunchSettings
from .errors import classify, first_line, translated
from .launcher import Launcher
from .pages import (
    OPENS_TAB,
    active_page,
    after_action,
    check_url,
    close_if_stuck,
    context_options,
    goto,
    info,
    jsonable,
    moved,
    tab_index,
    title,
    wait_for_new_tab,
)
from .session import BrowserSession

log = logging.getLogger(__name__)

Ctx = ToolContext[BrowserSession]


class BrowserBackend(Backend[BrowserConfig, BrowserSession]):
    """A real Chromium through Playwright: navigate, read, click, type, screenshot."""

    description: ClassVar[str] = (
        "A real web browser (Chromium). Each session is a private browser context with its own cookies, "
        "storage and tabs. Read pages with `snapshot` (accessibility tree with refs like e12) and act on "
        "elements by ref with click/type/select_option/hover; `screenshot` shows what it looks like."
    )
    Config: ClassVar[type[BrowserConfig]] = BrowserConfig

    def __init__(self, name: str, defaults: dict[str, Any] | None = None) -> None:
        super().__init__(name, defaults)
        launch_keys = LaunchSettings.model_fields.keys()
        self.settings = LaunchSettings.model_validate({k: v for k, v in self.defaults.items() if k in launch_keys})
        self.launcher = Launcher(self.settings)
        self._sessions: set[BrowserSession] = set()

    def session_config(self, overrides: dict[str, Any] | None = None) -> BrowserConfig:
        """Validate a session's config over the manifest defaults (launch settings excluded).

        Raises:
            pydantic.ValidationError: a key is unknown or a value is wrong.
        """
        launch_keys = LaunchSettings.model_fields.keys()
        defaults = {k: v for k, v in self.defaults.items() if k not in launch_keys}
        return BrowserConfig.model_validate({**defaults, **(overrides or {})})

    # -- lifecycle ---------------------------------------------------------------------

    async def warmup(self) -> None:
        """Launch the shared headless Chromium (and the Playwright driver)."""
        await self.launcher.browser(None)

    async def shutdown(self) -> None:
        """Close any context left, the browser and the driver; no Chromium process survives."""
        for state in list(self._sessions):
            await self._close_session(state)
        await self.launcher.close()

    async def initialize(self, worker_id: str, config: BrowserConfig) -> BrowserSession:
        """Open a private browser context (cookies, storage, cache, tabs) with one blank tab."""
        display = None
        if not config.headless:
            display = config.display or os.environ.get("DISPLAY")
            if not display:
                raise ParameterError(
                    "headless=false needs an X display: pass `display` (e.g. a vm session's ':1') "
                    "or start the server with DISPLAY set"
                )
        prefix = "agentflow-browser-" + re.sub(r"[^\w.-]", "_", worker_id)[:40] + "-"
        download_dir = await anyio.to_thread.run_sync(make_scratch_dir, prefix)
        try:
            state = await self._open_context(worker_id, config, display, download_dir)
        except BaseException:
            await anyio.to_thread.run_sync(functools.partial(shutil.rmtree, download_dir, ignore_errors=True))
            raise
        self._sessions.add(state)
        return state

    async def cleanup(self, worker_id: str, session_info: SessionInfo) -> None:
        """Close the session's tabs and context and delete its downloads."""
        state = session_info.state
        if isinstance(state, BrowserSession):
            await self._close_session(state)

    def describe(self, state: BrowserSession) -> dict[str, Any]:
        return {
            "tabs": len(state.pages),
            "download_dir": str(state.download_dir),
            "browser_pids": self.launcher.pids_of(state.handle.tag),
        }

    async def health(self, state: BrowserSession) -> str | None:
        return state.problem()

    async def _open_context(
        self, worker_id: str, config: BrowserConfig, display: str | None, download_dir: Path
    ) -> BrowserSession:
        for attempt in (1, 2):
            handle = await self.launcher.browser(display)
            try:
                context = await handle.browser.new_context(**context_options(config))
            except PlaywrightError as exc:
                error = classify("opening a browser context", exc)
                if attempt == 1 and not handle.alive:
                    continue  # the browser died under us: relaunch once
                if "timezone" in exc.message.lower() or "storage" in exc.message.lower():
                    raise ParameterError(f"bad session config: {first_line(exc.message)}") from exc
                raise error from exc
            break
        handle.contexts += 1
        context.set_default_timeout(config.timeout_ms)
        context.set_default_navigation_timeout(config.navigation_timeout_ms)
        state = BrowserSession(worker_id, config, handle, context, download_dir)
        try:
            await state.wire()
            await state.new_page()
        except BaseException:
            await state.close()
            await self.launcher.release(handle)
            raise
        return state

    async def _close_session(self, state: BrowserSession) -> None:
        if state in self._sessions:
            self._sessions.discard(state)
            with anyio.CancelScope(shield=True):
                await state.close()
                await self.launcher.release(state.handle)
                await anyio.to_thread.run_sync(functools.partial(shutil.rmtree, state.download_dir, ignore_errors=True))

    # -- navigation --------------------------------------------------------------------

    @tool(open_world=True)
    async def navigate(self, ctx: Ctx, args: NavigateArgs) -> dict[str, Any]:
        """Open a URL in the active tab and wait for it to load. Returns the final URL, title and HTTP status.
        Next, call snapshot to read the page and get element refs."""
        state, page = await active_page(ctx)
        url = check_url(state, args.url)
        timeout = args.timeout_ms or state.config.navigation_timeout_ms
        async with translated(f"navigate to {url}", timeout):
            response = await goto(page, url, args.wait_until, timeout)
        data = await info(state)
        data["status"] = response.status if response else None
        if response is not None and response.status >= 400:
            data["note"] = f"the server answered HTTP {response.status}"
        return data

    @tool()
    async def back(self, ctx: Ctx) -> dict[str, Any]:
        """Go back one page in the active tab's history."""
        state, page = await active_page(ctx)
        async with translated("back", state.config.navigation_timeout_ms):
            response = await page.go_back()
        return await moved(state, response is not None, "no previous page in this tab's history")

    @tool()
    async def forward(self, ctx: Ctx) -> dict[str, Any]:
        """Go forward one page in the active tab's history."""
        state, page = await active_page(ctx)
        async with translated("forward", state.config.navigation_timeout_ms):
            response = await page.go_forward()
        return await moved(state, response is not None, "no next page in this tab's history")

    @tool()
    async def reload(self, ctx: Ctx) -> dict[str, Any]:
        """Reload the active tab (also revives a tab whose renderer crashed)."""
        state = ctx.state
        state.check_alive()
        if not state.pages:
            await state.new_page()
        page = state.pages[state.active]  # not state.page(): that refuses a crashed tab
        async with translated("reload", state.config.navigation_timeout_ms):
            await page.reload()
        state.crashed_pages.discard(id(page))
        return await info(state)

    # -- reading -----------------------------------------------------------------------

    @tool(read_only=True)
    async def snapshot(self, ctx: Ctx, args: SnapshotArgs) -> dict[str, Any]:
        """The page's accessibility tree as compact text: roles, names, text and values, with a ref such as
        [ref=e12] on elements. Pass refs to click, type, hover, select_option, scroll, screenshot, get_text.
        Refs stay valid until the page changes; after navigating or big updates, take a new snapshot."""
        state, page = await active_page(ctx)
        async with translated("snapshot", state.config.timeout_ms):
            root = await snapshot.locate(page, args.ref, args.selector) if args.ref or args.selector else None
            text, truncated = await snapshot.take(page, root, args.max_chars)
        data = await info(state)
        data["snapshot"] = text
        if truncated:
            data["truncated"] = True
            data["note"] = f"cut at {args.max_chars} chars: raise max_chars or snapshot a subtree with ref"
        return data

    @tool(read_only=True)
    async def screenshot(self, ctx: Ctx, args: ScreenshotArgs) -> ToolResult:
        """A PNG of the active tab's viewport (or full_page, or one element by ref/selector).
        Viewport screenshots are in CSS pixels: x,y in the image are what click(x, y) takes."""
        state, page = await active_page(ctx)
        limit = self.settings.max_image_bytes
        async with translated("screenshot", state.config.timeout_ms):
            target = await snapshot.locate(page, args.ref, args.selector) if args.ref or args.selector else page
            shot = await capture(target, full_page=args.full_page, limit=limit, timeout_ms=state.config.timeout_ms)
        data = await info(state)
        data.update(width=shot.width, height=shot.height, format=shot.mime_type.split("/")[1], scale=1.0)
        if shot.note:
            data["note"] = shot.note
        return ToolResult(data=data, images=[Image(shot.data, shot.mime_type)])

    @tool(read_only=True)
    async def get_text(self, ctx: Ctx, args: GetTextArgs) -> dict[str, Any]:
        """The readable text of the page (or of one element), as a user sees it, cut at max_chars."""
        state, page = await active_page(ctx)
        async with translated("get_text", state.config.timeout_ms):
            target = (
                await snapshot.locate(page, args.ref, args.selector)
                if args.ref or args.selector
                else page.locator("body")
            )
            text = await target.inner_text()
        text = re.sub(r"\n\s*\n\s*\n+", "\n\n", text).strip()
        text, truncated = snapshot.bounded(text, args.max_chars)
        data = await info(state)
        data.update(text=text, truncated=truncated)
        return data

    @tool()
    async def evaluate(self, ctx: Ctx, args: EvaluateArgs) -> dict[str, Any]:
        """Run JavaScript in the active tab and return its result as JSON (DOM nodes come back as
        'ref: <Node>'; functions as null). Use for reading data the snapshot does not show."""
        state, page = await active_page(ctx)
        async with translated("evaluate", state.config.timeout_ms):
            target = await snapshot.locate(page, args.ref, None) if args.ref else page
        try:
            result = await asyncio.wait_for(target.evaluate(args.expression), args.timeout_ms / 1000)
        except TimeoutError:
            closed = await close_if_stuck(state, page)
            raise ExecutionTimeout(
                f"the script did not finish within {args.timeout_ms} ms"
                + ("; the tab was stuck in it and has been closed (see tabs)" if closed else "")
            ) from None
        except PlaywrightError as exc:
            error = classify("evaluate", exc)
            if isinstance(error, BackendError):
                raise BackendError(f"the script threw {first_line(exc.message)}") from exc
            raise error from exc
        text = json.dumps(jsonable(result), ensure_ascii=False)
        data = await info(state)
        if len(text) > args.max_chars:
            data.update(result=text[: args.max_chars], truncated=True, note="result JSON cut; returned as text")
        else:
            data.update(result=jsonable(result), truncated=False)
        return data

    @tool(read_only=True)
    async def console(self, ctx: Ctx, args: ConsoleArgs) -> dict[str, Any]:
        """Recent console messages, uncaught page errors, dialogs and downloads of this session's tabs."""
        state = ctx.state
        state.check_alive()
        items, dropped = state.recent_console(300, args.clear)
        if args.errors_only:
            items = [m for m in items if m["type"] in ("error", "pageerror", "crash")]
        data = await info(state)
        data.update(messages=items[-args.limit :], older_dropped=dropped, downloads=list(state.downloads))
        return data

    # -- acting ------------------------------------------------------------------------

    @tool()
    async def click(self, ctx: Ctx, args: ClickArgs) -> dict[str, Any]:
        """Click an element by ref (from snapshot) or selector, or a viewport point (x, y) from a
        screenshot."""
        state, page = await active_page(ctx)
        tabs_before = len(state.pages)
        count = 2 if args.double else 1
        new_tab = False
        state.tab_opened.clear()
        async with translated("click", state.config.timeout_ms):
            if args.x is not None and args.y is not None:
                new_tab = await page.evaluate(
                    f"([x, y]) => ({OPENS_TAB})(document.elementFromPoint(x, y))", [args.x, args.y]
                )
                for key in args.modifiers:
                    await page.keyboard.down(key)
                try:
                    await page.mouse.click(args.x, args.y, button=args.button, click_count=count)
                finally:
                    for key in args.modifiers:
                        await page.keyboard.up(key)
            else:
                target = await snapshot.locate(page, args.ref, args.selector)
                new_tab = await target.evaluate(OPENS_TAB)
                await target.click(button=args.button, click_count=count, modifiers=args.modifiers)
        if new_tab or args.button == "middle" or {"Control", "Meta", "Shift"} & set(args.modifiers):
            await wait_for_new_tab(state, tabs_before)
        return await after_action(state, page, tabs_before)

    @tool(name="type")
    async def type_(self, ctx: Ctx, args: TypeArgs) -> dict[str, Any]:
        """Type text into a field (by ref or selector; default: the focused element). Replaces the field's
        content unless clear=false; submit=true presses Enter afterwards."""
        state, page = await active_page(ctx)
        tabs_before = len(state.pages)
        async with translated("type", state.config.timeout_ms):
            if args.ref or args.selector:
                target = await snapshot.locate(page, args.ref, args.selector)
                if args.clear:
                    await target.fill(args.text)
                else:
                    await target.press_sequentially(args.text)
                if args.submit:
                    await target.press("Enter")
            else:
                await page.keyboard.type(args.text)
                if args.submit:
                    await page.keyboard.press("Enter")
        return await after_action(state, page, tabs_before)

    @tool()
    async def press(self, ctx: Ctx, args: PressArgs) -> dict[str, Any]:
        """Press a key or chord ('Enter', 'Escape', 'Tab', 'ArrowDown', 'Control+A') in the focused
        element, or in the element given by ref/selector."""
        state, page = await active_page(ctx)
        tabs_before = len(state.pages)
        async with translated("press", state.config.timeout_ms):
            if args.ref or args.selector:
                await (await snapshot.locate(page, args.ref, args.selector)).press(args.key)
            else:
                await page.keyboard.press(args.key)
        return await after_action(state, page, tabs_before)

    @tool()
    async def hover(self, ctx: Ctx, args: HoverArgs) -> dict[str, Any]:
        """Move the mouse over an element (opens hover menus and tooltips)."""
        state, page = await active_page(ctx)
        async with translated("hover", state.config.timeout_ms):
            await (await snapshot.locate(page, args.ref, args.selector)).hover()
        return await info(state)

    @tool()
    async def select_option(self, ctx: Ctx, args: SelectOptionArgs) -> dict[str, Any]:
        """Choose option(s) of a <select> (combobox in the snapshot) by value or visible label."""
        state, page = await active_page(ctx)
        tabs_before = len(state.pages)
        async with translated("select_option", state.config.timeout_ms):
            target = await snapshot.locate(page, args.ref, args.selector)
            selected = await target.select_option(args.values)
        data = await after_action(state, page, tabs_before)
        data["selected"] = selected
        return data

    @tool()
    async def scroll(self, ctx: Ctx, args: ScrollArgs) -> dict[str, Any]:
        """Scroll the page (or the scrollable area under the viewport's centre) by a number of pixels,
        or scroll an element (ref/selector) into view. Returns the new scroll position."""
        state, page = await active_page(ctx)
        async with translated("scroll", state.config.timeout_ms):
            if args.ref or args.selector:
                await (await snapshot.locate(page, args.ref, args.selector)).scroll_into_view_if_needed()
            else:
                width, height = state.config.viewport
                step = args.amount or int((height if args.direction in ("up", "down") else width) * 0.8)
                dx = {"left": -step, "right": step}.get(args.direction, 0)
                dy = {"up": -step, "down": step}.get(args.direction, 0)
                await page.mouse.move(width / 2, height / 2)
                await page.mouse.wheel(dx, dy)
                await page.wait_for_timeout(50)  # wheel scrolling is applied asynchronously
            position = await page.evaluate(
                "() => ({x: scrollX, y: scrollY, page_width: document.documentElement.scrollWidth,"
                " page_height: document.documentElement.scrollHeight})"
            )
        data = await info(state)
        data["scroll"] = position
        return data

    @tool()
    async def wait_for(self, ctx: Ctx, args: WaitForArgs) -> dict[str, Any]:
        """Wait until text appears (text), disappears (text_gone), a selector is visible, or some
        seconds pass."""
        state, page = await active_page(ctx)
        if args.seconds is not None:
            await asyncio.sleep(args.seconds)
            return await info(state)
        if args.selector is not None:
            what, locator, wanted = (
                f"selector {args.selector!r}",
                page.locator(args.selector).first,
                "visible",
            )
        else:
            text = args.text if args.text is not None else args.text_gone
            wanted = "visible" if args.text is not None else "hidden"
            what, locator = f"text {text!r}", page.get_by_text(str(text)).first
        try:
            await locator.wait_for(state=wanted, timeout=args.timeout_ms)
        except PlaywrightError as exc:
            if "Timeout" in type(exc).__name__:
                verb = "disappear" if wanted == "hidden" else "appear"
                raise ExecutionTimeout(f"{what} did not {verb} within {args.timeout_ms} ms") from exc
            raise classify("wait_for", exc) from exc
        return await info(state)

    @tool()
    async def tabs(self, ctx: Ctx, args: TabsArgs) -> dict[str, Any]:
        """List, open (optionally at url), select or close tabs. Other tools act on the active tab;
        links that open a new tab make it active."""
        state = ctx.state
        state.check_alive()
        async with translated(f"tabs {args.action}", state.config.navigation_timeout_ms):
            if args.action == "new":
                url = check_url(state, args.url) if args.url else None
                page = await state.new_page()
                if url:
                    await page.goto(url)
            elif args.action == "select":
                tab_index(state, args.index)
                state.active = int(args.index or 0)
                await state.pages[state.active].bring_to_front()
            elif args.action == "close":
                index = tab_index(state, args.index if args.index is not None else state.active)
                await state.pages[index].close()
                if not state.pages:
                    await state.new_page()
        data = await info(state)
        data["tabs"] = [
            {"index": i, "url": p.url, "title": await title(p), "active": i == state.active}
            for i, p in enumerate(state.pages)
        ]
        return data

    @tool(read_only=True)
    async def downloads(self, ctx: Ctx) -> dict[str, Any]:
        """Files this session downloaded (saved in a private directory deleted with the session)."""
        state = ctx.state
        state.check_alive()
        return {"directory": str(state.download_dir), "downloads": list(state.downloads)}


# -- helpers ---------------------------------------------------------------------------
