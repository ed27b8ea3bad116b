"""Page-level helpers of the browser backend: navigation, URL policy, tab and result info."""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import re
from typing import Any
from urllib.parse import urlsplit

import anyio
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Page, Response

from backends.base import ToolContext
from backends.browser.models import BrowserConfig, PageResult
from backends.browser.session import BrowserSession
from session.errors import BackendError, ParameterError, PermissionDenied

log = logging.getLogger(__name__)

Ctx = ToolContext[BrowserConfig, BrowserSession]
_SCHEMES = {"http", "https", "about", "data"}
_BARE_HOST = re.compile(r"^(?:[\w-]+\.)*[\w-]+(?::\d+)?(?:[/?#].*)?$")


def context_options(config: BrowserConfig) -> dict[str, Any]:
    width, height = config.viewport
    options: dict[str, Any] = {
        "viewport": {"width": width, "height": height},
        "accept_downloads": True,
        "ignore_https_errors": config.ignore_https_errors,
    }
    if config.block:
        options["service_workers"] = "block"  # requests of service workers would bypass the block routes
    optional = {
        "user_agent": config.user_agent,
        "locale": config.locale,
        "timezone_id": config.timezone,
        "extra_http_headers": config.extra_headers or None,
        "storage_state": config.storage_state,
    }
    options.update({k: v for k, v in optional.items() if v is not None})
    return options


async def active_page(ctx: Ctx) -> tuple[BrowserSession, Page]:
    state = ctx.state
    if not isinstance(state, BrowserSession):
        raise BackendError("browser tool called without a browser session")
    return state, await state.page()


#: Longest URL or title a result repeats (a data: URL can be megabytes).
URL_CHARS = 2_000


def shown_url(url: str) -> str:
    """`url`, cut to `URL_CHARS` with a marker if longer."""
    return url if len(url) <= URL_CHARS else url[:URL_CHARS] + f"...[{len(url) - URL_CHARS} more chars]"


async def title(page: Page) -> str:
    with contextlib.suppress(Exception), anyio.move_on_after(2):
        return await page.title()
    return ""


async def info(state: BrowserSession) -> dict[str, Any]:
    """`url` and `title` of the active tab (every result carries them), and the tab count if > 1."""
    if not state.pages:
        return {"url": None, "title": None}
    page = state.pages[state.active]
    data: dict[str, Any] = {"url": shown_url(page.url), "title": (await title(page))[:URL_CHARS]}
    if len(state.pages) > 1:
        data["tab"] = state.active
        data["tab_count"] = len(state.pages)
    return data


async def moved(state: BrowserSession, moved: bool, why_not: str) -> dict[str, Any]:
    data = await info(state)
    data["moved"] = moved
    if not moved:
        data["note"] = why_not
    return data


def page_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Only the keys a `PageResult` knows (for building subclasses from `info`)."""
    return {k: v for k, v in data.items() if k in PageResult.model_fields}


# Whether clicking an element opens a new tab (a link or form with a target other than this frame).
OPENS_TAB = """el => {
    const owner = el && el.closest && el.closest('a[target], area[target], form[target]');
    const target = owner ? owner.getAttribute('target').toLowerCase() : '';
    return !!target && !['_self', '_parent', '_top'].includes(target);
}"""


async def wait_for_new_tab(state: BrowserSession, opened: anyio.Event, tabs_before: int, seconds: float = 2.0) -> None:
    """The tab a click opens shows up a little after the click returns: wait for it (bounded)."""
    if len(state.pages) <= tabs_before:
        with anyio.move_on_after(seconds):
            await opened.wait()


async def after_action(state: BrowserSession, page: Page, tabs_before: int) -> dict[str, Any]:
    """Let a navigation the action started reach DOMContentLoaded, then describe where we are."""
    with contextlib.suppress(Exception):
        await page.wait_for_load_state("domcontentloaded", timeout=min(5.0, state.config.navigation_timeout) * 1000)
    data = await info(state)
    if len(state.pages) > tabs_before:
        data["note"] = f"a new tab opened and is now active (tab {state.active})"
    return data


async def goto(page: Page, url: str, wait_until: Any, wait: float) -> Response | None:
    """`page.goto`, made robust against Chromium's error page.

    After a failed navigation Chromium commits `chrome-error://` a moment later, and the
    next navigation away from that error page is restarted by Chromium; either shows up as
    "interrupted by another navigation". So: on failure, let the error page settle before
    reporting; when interrupted by the error page or by a restart of ours, try once more.
    """
    for attempt in (1, 2):
        try:
            return await page.goto(url, wait_until=wait_until, timeout=wait * 1000)
        except PlaywrightError as exc:
            if "net::" in exc.message and "ERR_ABORTED" not in exc.message:
                await error_page_committed(page)
            interrupted = re.search(r'interrupted by another navigation to "([^"]*)"', exc.message)
            if attempt == 1 and interrupted and interrupted.group(1) in (url, "chrome-error://chromewebdata/"):
                continue
            if interrupted and interrupted.group(1) == url:
                # Chromium restarts some navigations itself (file:// directory listings): the
                # restarted one is the page we asked for; wait for it instead of failing.
                await page.wait_for_load_state(wait_until if wait_until != "commit" else "load", timeout=wait * 1000)
                if page.url == url:
                    return None
            raise
    return None


async def error_page_committed(page: Page) -> None:
    """Wait (briefly) until Chromium's error page for a failed navigation has replaced the old page."""
    if page.url.startswith("chrome-error:"):
        return
    with contextlib.suppress(Exception):
        await page.wait_for_event("framenavigated", predicate=lambda frame: frame == page.main_frame, timeout=1_000)


def check_url(state: BrowserSession, raw: str) -> str:
    """The URL to open, or a ParameterError/PermissionDenied saying why not."""
    url = raw.strip()
    if not url:
        raise ParameterError("the URL is empty; give an absolute URL such as https://example.com/")
    shown = raw[:200] + ("..." if len(raw) > 200 else "")
    if "://" not in url and not url.startswith(("about:", "data:", "file:", "javascript:")):
        if not _BARE_HOST.match(url):
            raise ParameterError(f"{shown!r} is not a URL; give an absolute URL such as https://example.com/")
        local = url.startswith(("localhost", "127.", "[::1]"))
        url = ("http://" if local else "https://") + url
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if not state.allow_file_urls:
            raise PermissionDenied(
                "file:// URLs are refused: the operator's policy for this resource does not set allow_file_urls"
            )
    elif scheme not in _SCHEMES:
        hint = "; use evaluate to run scripts" if scheme == "javascript" else ""
        raise ParameterError(f"URL scheme {scheme[:50]!r} is not supported (http, https, data, about){hint}")
    elif scheme in ("http", "https") and not parts.hostname:
        raise ParameterError(f"{shown!r} has no host; give an absolute URL such as https://example.com/")
    if state.is_blocked(url):
        raise PermissionDenied(f"{shown} matches this session's `block` patterns")
    return url


def tab_index(state: BrowserSession, index: int | None) -> int:
    if index is None or not 0 <= index < len(state.pages):
        raise ParameterError(f"no tab {index}; there are {len(state.pages)} tabs (0..{len(state.pages) - 1})")
    return index


async def close_if_stuck(state: BrowserSession, page: Page) -> bool:
    """After a script timed out: close the tab if its JS thread no longer answers; True if closed."""
    with contextlib.suppress(Exception), anyio.move_on_after(1.0):
        await page.evaluate("1")
        return False
    log.warning("closing a tab stuck in a script")
    with contextlib.suppress(Exception), anyio.move_on_after(10):
        await page.close(run_before_unload=False)
    if not state.pages:
        with contextlib.suppress(Exception):
            await state.new_page()
    return True


def jsonable(value: Any) -> Any:
    """A JSON-encodable copy of what Playwright handed back (NaN/Infinity become null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    return str(value)
