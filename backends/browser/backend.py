"""The `browser` backend: one shared sandboxed Chromium, a private browser context per session.

Hybrid lifecycle: `warmup`/`shutdown` start and stop the shared browser, its Playwright
driver and the egress proxy (`Launcher`); `initialize`/`cleanup` open and close one
session's context (`BrowserSession`) with its own proxy account, so the proxy applies
that session's network policy. Tools act on the session's active tab and point at
elements by the refs of `snapshot`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import anyio
from playwright.async_api import Error as PlaywrightError

from backends.base import Backend, Image, Runtime, SessionSetup, ToolContext, ToolResult, tool
from backends.browser import snapshot
from backends.browser.capture import capture
from backends.browser.errors import classify, first_line, translated
from backends.browser.launcher import Display, Launcher
from backends.browser.models import (
    ActionResult,
    BrowserConfig,
    BrowserSettings,
    ClickArgs,
    ConsoleArgs,
    ConsoleResult,
    DownloadsResult,
    EvaluateArgs,
    EvaluateResult,
    GetTextArgs,
    HoverArgs,
    MoveResult,
    NavigateArgs,
    NavigateResult,
    PageResult,
    PressArgs,
    ScreenshotArgs,
    ScreenshotResult,
    ScrollArgs,
    ScrollResult,
    SelectOptionArgs,
    SnapshotArgs,
    SnapshotResult,
    TabsArgs,
    TabsResult,
    TextResult,
    TypeArgs,
    WaitForArgs,
)
from backends.browser.pages import (
    OPENS_TAB,
    URL_CHARS,
    active_page,
    after_action,
    check_url,
    close_if_stuck,
    context_options,
    goto,
    info,
    jsonable,
    moved,
    page_fields,
    shown_url,
    tab_index,
    title,
    wait_for_new_tab,
)
from backends.browser.proxy import MARK, EgressProxy, Grant
from backends.browser.session import BrowserSession
from backends.policy import Policy
from session.errors import (
    BackendError,
    ConfigurationError,
    ExecutionTimeout,
    ParameterError,
    PermissionDenied,
)

log = logging.getLogger(__name__)

Ctx = ToolContext[BrowserConfig, BrowserSession]
_DISPLAY_RE = re.compile(r"^:\d{1,5}(\.\d{1,3})?$")
#: Cap on a JSON/text result body, so the whole result stays under the client's 1 MiB event.
RESULT_CHARS = 200_000


class BrowserBackend(Backend[BrowserConfig, BrowserSession]):
    """A real Chromium through Playwright: navigate, read, click, type, screenshot."""

    description: ClassVar[str] = (
        "A real web browser (Chromium). Each session is a private browser context with its own cookies, "
        "storage and tabs. Read pages with `snapshot` (accessibility tree with refs like e12) and act on "
        "elements by ref with click/type/select_option/hover; `screenshot` shows what it looks like."
    )
    Config: ClassVar[type[BrowserConfig]] = BrowserConfig
    Settings: ClassVar[type[BrowserSettings]] = BrowserSettings
    #: Pages reach the internet (never loopback or private addresses unless the policy lists them).
    default_policy: ClassVar[Policy] = Policy(network="internet")
    #: One shared Chromium: gVisor cannot host it (the engine answers 5001).
    isolation_tiers: ClassVar[frozenset[str]] = frozenset({"none", "sandbox"})
    #: Config keys naming another session of the same principal; the engine resolves them and
    #: hands that session's `export(state)` to `initialize` as `setup.links[key]`.
    links: ClassVar[dict[str, str]] = {"display": "vm"}

    settings: BrowserSettings

    def __init__(
        self,
        name: str,
        *,
        settings: Mapping[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
        policy: Policy | None = None,
        runtime: Runtime | None = None,
    ) -> None:
        super().__init__(name, settings=settings, defaults=defaults, policy=policy, runtime=runtime)
        if self.policy.isolation not in self.isolation_tiers:
            raise ConfigurationError(
                f"resources.{name}.policy.isolation = {self.policy.isolation!r}: the shared browser can run "
                f"with {sorted(self.isolation_tiers)} only"
            )
        if self.policy.isolation == "none" and os.geteuid() == 0:
            # Unconfined as root, Chromium could only run with `--no-sandbox`, and a renderer
            # exploit would then own the server's user.
            raise ConfigurationError(
                f"resources.{name}.policy.isolation = 'none' needs a server that does not run as root: "
                "Chromium's own sandbox cannot run as root, and it never runs without it. Use isolation "
                "'sandbox' (Chromium then runs as an unprivileged uid in its own sandbox) or start the "
                "server as a non-root user"
            )
        self.proxy = EgressProxy()
        self.launcher = Launcher(
            self.settings, self.runtime.scratch_root, confine=self.policy.isolation != "none", proxy=self.proxy
        )
        self._sessions: set[BrowserSession] = set()

    # -- lifecycle ---------------------------------------------------------------------

    async def warmup(self) -> None:
        """Launch the shared headless Chromium (and the Playwright driver and egress proxy)."""
        await self.launcher.browser(None)

    async def shutdown(self) -> None:
        """Close any context left, the browser, the driver and the proxy; no Chromium process survives."""
        for state in list(self._sessions):
            await self._close_session(state)
        await self.launcher.close()

    async def initialize(self, setup: SessionSetup[BrowserConfig]) -> BrowserSession:
        """Open a private browser context (cookies, storage, cache, tabs) with one blank tab."""
        policy = setup.policy
        if policy.isolation == "gvisor":
            raise ConfigurationError("the browser cannot run in gVisor (tiers: none, sandbox)")
        if policy.isolation == "sandbox" and not self.launcher.confine:
            raise ConfigurationError(
                "this server's shared browser runs unconfined (the operator's policy says isolation='none'); "
                "it cannot give one session a sandbox"
            )
        display = self._display(setup)
        try:
            grant = self.proxy.grant(setup.label, policy.allow_private_hosts, network=policy.network)
        except ValueError as exc:
            raise ConfigurationError(f"policy.allow_private_hosts: {exc}") from None
        download_dir = setup.scratch / "downloads"
        try:
            await anyio.Path(download_dir).mkdir(parents=True, exist_ok=True)
            state = await self._open_context(setup, display, download_dir, grant)
        except BaseException:
            self.proxy.revoke(grant)
            raise
        state.allow_file_urls = policy.allow_file_urls
        self._sessions.add(state)
        return state

    async def cleanup(self, setup: SessionSetup[BrowserConfig], state: BrowserSession) -> None:
        """Close the session's tabs and context and revoke its proxy account (the engine removes scratch)."""
        await self._close_session(state)

    def describe(self, state: BrowserSession) -> dict[str, Any]:
        return {
            "tabs": len(state.pages),
            "download_dir": str(state.download_dir),
            "browser_pids": self.launcher.pids_of(state.handle.tag),
            "headed_display": state.handle.display.display if state.handle.display else None,
            "requests_refused_by_policy": state.grant.refused,
        }

    async def health(self, state: BrowserSession) -> str | None:
        return state.problem()

    def status(self) -> dict[str, Any]:
        confined = self.launcher.confine
        return {
            "isolation": "sandbox" if confined else "none",
            "browser_uid": self.settings.browser_uid if confined and self.launcher.own_network else None,
            "browser_network": "own namespace, egress proxy only"
            if self.launcher.own_network
            else "host, egress proxy",
            # Every launch passes chromium_sandbox=True (see Launcher): on in both tiers.
            "chromium_sandbox": True,
        }

    def _display(self, setup: SessionSetup[BrowserConfig]) -> Display | None:
        """The linked vm desktop for a headed session, or None for headless.

        Raises:
            PermissionDenied: `display` is not one of the caller's vm sessions (1006).
            ParameterError: headless=false without a display (1002).
        """
        config = setup.config
        if config.headless and config.display is None:
            return None
        link = setup.links.get("display")
        if config.display is None:
            raise ParameterError("headless=false needs `display`: the session_id of one of your own vm sessions")
        if link is None:
            raise PermissionDenied(
                "`display` must be the session_id of one of your own vm sessions (nothing else is accepted)"
            )
        number = str(link.get("display", ""))
        if not _DISPLAY_RE.match(number):
            raise BackendError("the linked vm session did not export a usable X display")
        xauthority = link.get("xauthority")
        socket_dir = link.get("x11_socket_dir")
        return Display(
            display=number,
            xauthority=Path(xauthority) if xauthority else None,
            x11_socket_dir=Path(socket_dir) if socket_dir else None,
        )

    async def _open_context(
        self, setup: SessionSetup[BrowserConfig], display: Display | None, download_dir: Path, grant: Grant
    ) -> BrowserSession:
        config = setup.config
        options = context_options(config)
        for attempt in (1, 2):
            handle = await self.launcher.browser(display)
            options["proxy"] = {"server": handle.proxy_server, "username": grant.username, "password": grant.password}
            try:
                context = await handle.browser.new_context(**options)
            except PlaywrightError as exc:
                error = classify("opening a browser context", exc)
                if attempt == 1 and not self.launcher.handle_alive(handle):
                    continue  # the browser or driver died under us: relaunch once
                if "timezone" in exc.message.lower() or "storage" in exc.message.lower():
                    raise ParameterError(f"bad session config: {first_line(exc.message)}") from exc
                raise error from exc
            break
        handle.contexts += 1
        context.set_default_timeout(config.timeout * 1000)
        context.set_default_navigation_timeout(config.navigation_timeout * 1000)
        state = BrowserSession(setup.label, config, self.launcher, handle, context, download_dir, grant)
        try:
            private: tuple[str, ...] = ()
            if setup.policy.allow_file_urls:
                private = tuple(p for p in (str(self.launcher.root), self.launcher.profile_of(handle)) if p)
            await state.wire(private)
            await state.new_page()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await state.close()
                await self.launcher.release(handle)
            raise
        return state

    async def _close_session(self, state: BrowserSession) -> None:
        if state in self._sessions:
            self._sessions.discard(state)
            with anyio.CancelScope(shield=True):
                await state.close()
                self.proxy.revoke(state.grant)
                await self.launcher.release(state.handle)

    # -- navigation --------------------------------------------------------------------

    @tool(open_world=True)
    async def navigate(self, ctx: Ctx, args: NavigateArgs) -> NavigateResult:
        """Open a URL in the active tab and wait for it to load. Returns the final URL, title and HTTP status.
        Next, call snapshot to read the page and get element refs."""
        state, page = await active_page(ctx)
        url = check_url(state, args.url)
        timeout = args.timeout or state.config.navigation_timeout
        before = (state.grant.refused, state.grant.failed)
        try:
            async with translated(f"navigate to {url[:200]}", timeout):
                response = await goto(page, url, args.wait_until, timeout)
        except BackendError:
            self._raise_proxy_outcome(state, before)
            raise
        status = response.status if response else None
        if response is not None and await response.header_value(MARK.lower()):
            self._raise_proxy_outcome(state, before)
        result = NavigateResult(**page_fields(await info(state)), status=status)
        if status is not None and status >= 400:
            result.note = f"the server answered HTTP {status}"
        elif state.grant.refused > before[0]:
            count = state.grant.refused - before[0]
            result.note = f"{count} request(s) of this page were refused by the network policy"
        return result

    @staticmethod
    def _raise_proxy_outcome(state: BrowserSession, before: tuple[int, int]) -> None:
        """Turn what the egress proxy did during a navigation into the matching error, if anything."""
        if state.grant.refused > before[0]:
            raise PermissionDenied(f"navigation refused by the sandbox's network policy: {state.grant.refusals[-1]}")
        if state.grant.failed > before[1]:
            raise BackendError(f"navigation failed: {state.grant.failures[-1]}")

    @tool()
    async def back(self, ctx: Ctx) -> MoveResult:
        """Go back one page in the active tab's history."""
        state, page = await active_page(ctx)
        async with translated("back", state.config.navigation_timeout):
            response = await page.go_back()
        return MoveResult(**await moved(state, response is not None, "no previous page in this tab's history"))

    @tool()
    async def forward(self, ctx: Ctx) -> MoveResult:
        """Go forward one page in the active tab's history."""
        state, page = await active_page(ctx)
        async with translated("forward", state.config.navigation_timeout):
            response = await page.go_forward()
        return MoveResult(**await moved(state, response is not None, "no next page in this tab's history"))

    @tool()
    async def reload(self, ctx: Ctx) -> PageResult:
        """Reload the active tab (also revives a tab whose renderer crashed)."""
        state = ctx.state
        state.check_alive()
        if not state.pages:
            await state.new_page()
        page = state.pages[state.active]  # not state.page(): that refuses a crashed tab
        async with translated("reload", state.config.navigation_timeout):
            await page.reload()
        state.crashed_pages.discard(id(page))
        return PageResult(**await info(state))

    # -- reading -----------------------------------------------------------------------

    @tool(read_only=True)
    async def snapshot(self, ctx: Ctx, args: SnapshotArgs) -> SnapshotResult:
        """The page's accessibility tree as compact text: roles, names, text and values, with a ref such as
        [ref=e12] on elements. Pass refs to click, type, hover, select_option, scroll, screenshot, get_text.
        Refs stay valid until the page changes; after navigating or big updates, take a new snapshot."""
        state, page = await active_page(ctx)
        async with translated("snapshot", state.config.timeout):
            root = await snapshot.locate(page, args.ref, args.selector) if args.ref or args.selector else None
            text, truncated = await snapshot.take(page, root, args.max_chars)
        result = SnapshotResult(**await info(state), snapshot=text, truncated=truncated)
        if truncated:
            result.note = f"cut at {args.max_chars} chars: raise max_chars or snapshot a subtree with ref"
        return result

    @tool(read_only=True)
    async def screenshot(self, ctx: Ctx, args: ScreenshotArgs) -> ToolResult[ScreenshotResult]:
        """A PNG of the active tab's viewport (or full_page, or one element by ref/selector).
        Viewport screenshots are in CSS pixels: x,y in the image are what click(x, y) takes."""
        state, page = await active_page(ctx)
        limit = self.settings.max_image_bytes
        async with translated("screenshot", state.config.timeout):
            target = await snapshot.locate(page, args.ref, args.selector) if args.ref or args.selector else page
            shot = await capture(target, full_page=args.full_page, limit=limit, wait=state.config.timeout)
        result = ScreenshotResult(
            **await info(state), width=shot.width, height=shot.height, format=shot.mime_type.split("/")[1]
        )
        if shot.note:
            result.note = shot.note
        return ToolResult(data=result, images=[Image(shot.data, shot.mime_type)])

    @tool(read_only=True)
    async def get_text(self, ctx: Ctx, args: GetTextArgs) -> TextResult:
        """The readable text of the page (or of one element), as a user sees it, cut at max_chars."""
        state, page = await active_page(ctx)
        async with translated("get_text", state.config.timeout):
            target = (
                await snapshot.locate(page, args.ref, args.selector)
                if args.ref or args.selector
                else page.locator("body")
            )
            text = await target.inner_text()
        text = re.sub(r"\n\s*\n\s*\n+", "\n\n", text).strip()
        text, truncated = snapshot.bounded(text, min(args.max_chars, RESULT_CHARS))
        result = TextResult(**await info(state), text=text, truncated=truncated)
        if truncated:
            result.note = f"cut at {min(args.max_chars, RESULT_CHARS)} chars: get_text a part of the page with ref"
        return result

    @tool()
    async def evaluate(self, ctx: Ctx, args: EvaluateArgs) -> EvaluateResult:
        """Run JavaScript in the active tab and return its result as JSON (DOM nodes come back as
        'ref: <Node>'; functions as null). Use for reading data the snapshot does not show."""
        state, page = await active_page(ctx)
        async with translated("evaluate", state.config.timeout):
            target = await snapshot.locate(page, args.ref, None) if args.ref else page
        value: Any = None
        try:
            with anyio.fail_after(args.timeout):
                value = await target.evaluate(args.expression)
        except TimeoutError:
            closed = await close_if_stuck(state, page)
            raise ExecutionTimeout(
                f"the script did not finish within {args.timeout:g} s"
                + ("; the tab was stuck in it and has been closed (see tabs)" if closed else "")
            ) from None
        except PlaywrightError as exc:
            error = classify("evaluate", exc)
            if isinstance(error, BackendError):
                raise BackendError(f"the script threw {first_line(exc.message)}") from exc
            raise error from exc
        data = jsonable(value)
        text = json.dumps(data, ensure_ascii=False)
        limit = min(args.max_chars, RESULT_CHARS)
        result = EvaluateResult(**await info(state))
        if len(text) > limit:
            result.result, result.truncated = text[:limit], True
            result.note = f"result JSON was {len(text)} chars; cut at {limit} and returned as text"
        else:
            result.result = data
        return result

    @tool(read_only=True)
    async def console(self, ctx: Ctx, args: ConsoleArgs) -> ConsoleResult:
        """Recent console messages, uncaught page errors, dialogs and downloads of this session's tabs."""
        state = ctx.state
        state.check_alive()
        items, dropped = state.recent_console(300, args.clear)
        if args.errors_only:
            items = [m for m in items if m["type"] in ("error", "pageerror", "crash")]
        items = items[-args.limit :]
        # Keep the newest messages that fit the result budget (each is capped, 300 of them are not).
        kept, size = [], 0
        for item in reversed(items):
            size += len(item["text"]) + len(item.get("url") or "") + 100
            if size > RESULT_CHARS:
                break
            kept.append(item)
        kept.reverse()
        result = ConsoleResult(
            **await info(state),
            messages=kept,
            older_dropped=dropped + len(items) - len(kept),
            downloads=list(state.downloads)[-100:],
        )
        if len(kept) < len(items):
            result.note = f"only the newest {len(kept)} messages fit in one result"
        return result

    # -- acting ------------------------------------------------------------------------

    @tool()
    async def click(self, ctx: Ctx, args: ClickArgs) -> ActionResult:
        """Click an element by ref (from snapshot) or selector, or a viewport point (x, y) from a
        screenshot."""
        state, page = await active_page(ctx)
        tabs_before = len(state.pages)
        count = 2 if args.double else 1
        new_tab = False
        opened = state.expect_tab()
        async with translated("click", state.config.timeout):
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
            await wait_for_new_tab(state, opened, tabs_before)
        return ActionResult(**await after_action(state, page, tabs_before))

    @tool(name="type")
    async def type_(self, ctx: Ctx, args: TypeArgs) -> ActionResult:
        """Type text into a field (by ref or selector; default: the focused element). Replaces the field's
        content unless clear=false; submit=true presses Enter afterwards."""
        state, page = await active_page(ctx)
        tabs_before = len(state.pages)
        async with translated("type", state.config.timeout):
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
        return ActionResult(**await after_action(state, page, tabs_before))

    @tool()
    async def press(self, ctx: Ctx, args: PressArgs) -> ActionResult:
        """Press a key or chord ('Enter', 'Escape', 'Tab', 'ArrowDown', 'Control+A') in the focused
        element, or in the element given by ref/selector."""
        state, page = await active_page(ctx)
        tabs_before = len(state.pages)
        async with translated("press", state.config.timeout):
            if args.ref or args.selector:
                await (await snapshot.locate(page, args.ref, args.selector)).press(args.key)
            else:
                await page.keyboard.press(args.key)
        return ActionResult(**await after_action(state, page, tabs_before))

    @tool()
    async def hover(self, ctx: Ctx, args: HoverArgs) -> ActionResult:
        """Move the mouse over an element (opens hover menus and tooltips)."""
        state, page = await active_page(ctx)
        async with translated("hover", state.config.timeout):
            await (await snapshot.locate(page, args.ref, args.selector)).hover()
        return ActionResult(**await info(state))

    @tool()
    async def select_option(self, ctx: Ctx, args: SelectOptionArgs) -> ActionResult:
        """Choose option(s) of a <select> (combobox in the snapshot) by value or visible label."""
        state, page = await active_page(ctx)
        tabs_before = len(state.pages)
        async with translated("select_option", state.config.timeout):
            target = await snapshot.locate(page, args.ref, args.selector)
            selected = await target.select_option(args.values)
        return ActionResult(**await after_action(state, page, tabs_before), selected=selected)

    @tool()
    async def scroll(self, ctx: Ctx, args: ScrollArgs) -> ScrollResult:
        """Scroll the page (or the scrollable area under the viewport's centre) by a number of pixels,
        or scroll an element (ref/selector) into view. Returns the new scroll position."""
        state, page = await active_page(ctx)
        async with translated("scroll", state.config.timeout):
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
        return ScrollResult(**await info(state), scroll=position)

    @tool()
    async def wait_for(self, ctx: Ctx, args: WaitForArgs) -> PageResult:
        """Wait until text appears (text), disappears (text_gone), a selector is visible, or some
        seconds pass."""
        state, page = await active_page(ctx)
        if args.seconds is not None:
            await anyio.sleep(args.seconds)
            return PageResult(**await info(state))
        if args.selector is not None:
            what, locator = f"selector {args.selector[:100]!r}", page.locator(args.selector).first
            wanted: Literal["visible", "hidden"] = "visible"
        else:
            text = args.text if args.text is not None else args.text_gone
            wanted = "visible" if args.text is not None else "hidden"
            what, locator = f"text {str(text)[:100]!r}", page.get_by_text(str(text)).first
        try:
            await locator.wait_for(state=wanted, timeout=args.timeout * 1000)
        except PlaywrightError as exc:
            if "Timeout" in type(exc).__name__:
                verb = "disappear" if wanted == "hidden" else "appear"
                raise ExecutionTimeout(f"{what} did not {verb} within {args.timeout:g} s") from exc
            raise classify("wait_for", exc) from exc
        return PageResult(**await info(state))

    @tool()
    async def tabs(self, ctx: Ctx, args: TabsArgs) -> TabsResult:
        """List, open (optionally at url), select or close tabs. Other tools act on the active tab;
        links that open a new tab make it active."""
        state = ctx.state
        state.check_alive()
        async with translated(f"tabs {args.action}", state.config.navigation_timeout):
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
        listing = [
            {"index": i, "url": shown_url(p.url), "title": (await title(p))[:URL_CHARS], "active": i == state.active}
            for i, p in enumerate(state.pages)
        ]
        return TabsResult(**await info(state), tabs=listing)

    @tool(read_only=True)
    async def downloads(self, ctx: Ctx) -> DownloadsResult:
        """Files this session downloaded (saved in a private directory deleted with the session)."""
        state = ctx.state
        state.check_alive()
        return DownloadsResult(directory=str(state.download_dir), downloads=list(state.downloads))
