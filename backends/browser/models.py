"""The browser backend's models: per-session Config, backend-wide Settings, tool Args and Results.

Timeouts a model sees are in seconds (`timeout`, `navigation_timeout`); the millisecond
names of the first contract (`timeout_ms`, `navigation_timeout_ms`, `launch_timeout_ms`)
are still read and converted.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = logging.getLogger(__name__)

DEFAULT_EXECUTABLE = "/usr/bin/chromium"
#: Raw image bytes per screenshot: base64 makes them 4/3 larger, and the whole result must
#: stay under the MCP client's 1 MiB event limit.
MAX_IMAGE_BYTES = 640 * 1024
#: The uid the shared Chromium runs as; outside the per-session range of the sandbox (2,000,000+).
BROWSER_UID = 1_999_999

# The flags that keep Debian's Chromium quiet and stable in a small VM or container: no GPU,
# no background traffic, no /dev/shm (64 MiB /dev/shm in containers crashes renderers),
# no QUIC (UDP would not go through the egress proxy). Never `--no-sandbox`.
CHROMIUM_ARGS: tuple[str, ...] = (
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--force-webrtc-ip-handling-policy=disable_non_proxied_udp",
)
FORBIDDEN_ARGS = ("--no-sandbox", "--proxy-server", "--proxy-bypass-list", "--remote-debugging", "--user-data-dir")


def _ms_to_seconds(data: Any, pairs: dict[str, str]) -> Any:
    """Map old millisecond keys to the second-based ones (a value given in both wins in seconds)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for old, new in pairs.items():
        if old in data:
            value = data.pop(old)
            if new not in data and value is not None:
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise ValueError(f"{old} must be a number of milliseconds (better: {new} in seconds)")
                data[new] = value / 1000
    return data


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrowserSettings(_Model):
    """Backend-wide settings (manifest `resources.browser.settings`; a session cannot change them)."""

    executable_path: str = Field(
        DEFAULT_EXECUTABLE,
        description="Chromium binary. Debian's `chromium` package; Playwright's own download is not used.",
    )
    launch_args: list[str] = Field(default_factory=list, description="Extra Chromium command-line flags.")
    launch_timeout: float = Field(30.0, ge=1, le=600, description="Seconds a browser launch may take.")
    max_image_bytes: int = Field(
        MAX_IMAGE_BYTES,
        ge=64 * 1024,
        description=f"Screenshots above this many bytes are re-encoded as JPEG or clipped (at most {MAX_IMAGE_BYTES}).",
    )
    browser_uid: int = Field(
        BROWSER_UID,
        ge=1000,
        le=4_294_967_293,
        description="Unprivileged uid (and gid) the sandboxed Chromium runs as when the server is root.",
    )

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        return _ms_to_seconds(data, {"launch_timeout_ms": "launch_timeout"})

    @field_validator("max_image_bytes")
    @classmethod
    def _fits_one_message(cls, value: int) -> int:
        if value > MAX_IMAGE_BYTES:
            # Older manifests said 1 MiB: keep them starting, but never send what a client drops.
            log.warning(
                "browser max_image_bytes %d exceeds what fits one MCP message; using %d", value, MAX_IMAGE_BYTES
            )
            return MAX_IMAGE_BYTES
        return value

    @field_validator("launch_args")
    @classmethod
    def _no_unsafe_flags(cls, value: list[str]) -> list[str]:
        for flag in value:
            if flag.split("=", 1)[0] in FORBIDDEN_ARGS or flag.startswith("--remote-debugging"):
                raise ValueError(f"{flag!r} would undo the browser's sandbox or egress proxy; it is not allowed")
        return value


class BrowserConfig(_Model):
    """One session's browser context."""

    viewport: tuple[int, int] = Field(
        (1280, 800), description="Viewport [width, height] in CSS pixels; screenshots have this size."
    )
    user_agent: str | None = Field(None, max_length=1000, description="User-Agent header and navigator.userAgent.")
    locale: str | None = Field(None, max_length=50, description="Locale such as 'en-US' or 'de-DE'.")
    timezone: str | None = Field(None, max_length=100, description="IANA time zone such as 'Europe/Berlin'.")
    extra_headers: dict[str, str] = Field(default_factory=dict, description="HTTP headers sent with every request.")
    storage_state: dict[str, Any] | None = Field(
        None,
        description="Cookies and localStorage to start with (Playwright storage-state object: "
        "{'cookies': [...], 'origins': [...]}), e.g. to start logged in.",
    )
    headless: bool = Field(
        True,
        description="False shows the pages on the desktop of one of your vm sessions (give it as `display`).",
    )
    display: str | None = Field(
        None,
        max_length=200,
        description="For headless=false: the session_id of one of your own vm sessions, whose desktop shows "
        "the pages. Nothing else is accepted.",
    )
    block: list[str] = Field(
        default_factory=list,
        description="URL glob patterns to refuse, matched against the full URL ('*' matches anything), "
        "e.g. '*://ads.example.com/*' or '*.mp4'.",
    )
    ignore_https_errors: bool = Field(False, description="Accept invalid TLS certificates.")
    timeout: float = Field(5.0, ge=0.1, le=120, description="Default timeout of element actions, in seconds.")
    navigation_timeout: float = Field(30.0, ge=0.1, le=300, description="Default navigation timeout, in seconds.")
    dialogs: Literal["accept", "dismiss"] = Field(
        "accept", description="What to do with alert/confirm/prompt dialogs (each is logged to console)."
    )

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        return _ms_to_seconds(data, {"timeout_ms": "timeout", "navigation_timeout_ms": "navigation_timeout"})

    @field_validator("viewport")
    @classmethod
    def _sane_viewport(cls, value: tuple[int, int]) -> tuple[int, int]:
        width, height = value
        if not (100 <= width <= 7680 and 100 <= height <= 4320):
            raise ValueError("viewport must be [width, height] with 100 <= width <= 7680, 100 <= height <= 4320")
        return value


# -- tool arguments ----------------------------------------------------------------------

REF = "Element ref from the latest snapshot, e.g. 'e12'."
SELECTOR = "CSS or Playwright selector (e.g. '#login', 'text=Sign in'), if you have no ref."


class _Args(_Model):
    pass


class _Target(_Args):
    ref: str | None = Field(None, max_length=100, description=REF)
    selector: str | None = Field(None, max_length=10_000, description=SELECTOR)

    @model_validator(mode="after")
    def _one_target(self) -> _Target:
        if self.ref and self.selector:
            raise ValueError("pass either ref or selector, not both")
        return self


class _Timed(_Args):
    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        return _ms_to_seconds(data, {"timeout_ms": "timeout"})


class NavigateArgs(_Timed):
    url: str = Field(
        max_length=100_000,
        description="Absolute URL to open (http, https, data:, about:). A bare host like 'example.com' "
        "gets https:// (http:// for localhost).",
    )
    wait_until: Literal["load", "domcontentloaded", "networkidle", "commit"] = Field(
        "load", description="When the navigation counts as done."
    )
    timeout: float | None = Field(None, ge=0.1, le=300, description="Override the navigation timeout (seconds).")


class SnapshotArgs(_Target):
    ref: str | None = Field(None, max_length=100, description="Only the subtree at this ref (default: the whole page).")
    selector: str | None = Field(None, max_length=10_000, description="Only the subtree at this selector.")
    max_chars: int = Field(20_000, ge=500, le=200_000, description="Cut the snapshot after this many characters.")


class ClickArgs(_Target):
    x: float | None = Field(None, ge=0, description="Viewport x in CSS pixels (as in a viewport screenshot).")
    y: float | None = Field(None, ge=0, description="Viewport y in CSS pixels.")
    button: Literal["left", "right", "middle"] = Field("left", description="Mouse button.")
    double: bool = Field(False, description="Double-click.")
    modifiers: list[Literal["Alt", "Control", "Meta", "Shift"]] = Field(
        default_factory=list, description="Keys held during the click."
    )

    @model_validator(mode="after")
    def _one_way(self) -> ClickArgs:
        has_xy = self.x is not None or self.y is not None
        if has_xy and (self.x is None or self.y is None):
            raise ValueError("give both x and y")
        if sum([bool(self.ref), bool(self.selector), has_xy]) != 1:
            raise ValueError("give exactly one of: ref, selector, or x and y")
        return self


class TypeArgs(_Target):
    text: str = Field(max_length=1_000_000, description="Text to enter.")
    submit: bool = Field(False, description="Press Enter afterwards (submits most forms).")
    clear: bool = Field(True, description="Replace the field's content (false: append, typing key by key).")


class PressArgs(_Target):
    key: str = Field(
        max_length=100, description="Key or chord: 'Enter', 'Tab', 'Escape', 'ArrowDown', 'Control+A', 'Shift+Tab'."
    )
    ref: str | None = Field(None, max_length=100, description="Focus this element first (default: whatever has focus).")


class HoverArgs(_Target):
    pass


class SelectOptionArgs(_Target):
    values: list[str] = Field(min_length=1, max_length=1000, description="Option values or visible labels to select.")


class ScrollArgs(_Target):
    direction: Literal["down", "up", "left", "right"] = Field("down", description="Which way to scroll.")
    amount: int | None = Field(None, ge=1, le=100_000, description="Pixels to scroll (default: most of the viewport).")
    ref: str | None = Field(None, max_length=100, description="Scroll this element into view instead.")


class WaitForArgs(_Timed):
    text: str | None = Field(None, max_length=10_000, description="Wait until this text is visible.")
    text_gone: str | None = Field(None, max_length=10_000, description="Wait until this text is no longer visible.")
    selector: str | None = Field(
        None, max_length=10_000, description="Wait until an element matching this selector is visible."
    )
    seconds: float | None = Field(None, gt=0, le=30, description="Just wait this long.")
    timeout: float = Field(10.0, ge=0.1, le=60, description="Give up after this many seconds.")

    @model_validator(mode="after")
    def _one_condition(self) -> WaitForArgs:
        given = [v for v in (self.text, self.text_gone, self.selector, self.seconds) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of: text, text_gone, selector, seconds")
        return self


class ScreenshotArgs(_Target):
    ref: str | None = Field(None, max_length=100, description="Capture only this element.")
    selector: str | None = Field(
        None, max_length=10_000, description="Capture only the element matching this selector."
    )
    full_page: bool = Field(False, description="Capture the whole scrollable page, not just the viewport.")


class GetTextArgs(_Target):
    ref: str | None = Field(None, max_length=100, description="Text of this element only.")
    selector: str | None = Field(
        None, max_length=10_000, description="Text of the element matching this selector only."
    )
    max_chars: int = Field(20_000, ge=100, le=200_000, description="Cut the text after this many characters.")


class EvaluateArgs(_Timed):
    expression: str = Field(
        max_length=1_000_000,
        description="JavaScript expression or function, e.g. 'document.title' or "
        "'() => [...document.links].map(a => a.href)'. With `ref`, a function receiving the element: "
        "'el => el.value'. Promises are awaited.",
    )
    ref: str | None = Field(None, max_length=100, description=REF)
    timeout: float = Field(10.0, ge=0.1, le=60, description="Give up (and close a stuck tab) after this many seconds.")
    max_chars: int = Field(20_000, ge=100, le=200_000, description="Cut a larger JSON result.")


class TabsArgs(_Args):
    action: Literal["list", "new", "select", "close"] = Field("list", description="What to do.")
    index: int | None = Field(None, ge=0, description="Tab index for select/close (close: default active tab).")
    url: str | None = Field(None, max_length=100_000, description="URL to open in the new tab (action='new').")

    @model_validator(mode="after")
    def _needs_index(self) -> TabsArgs:
        if self.action == "select" and self.index is None:
            raise ValueError("action='select' needs index")
        return self


class ConsoleArgs(_Args):
    limit: int = Field(50, ge=1, le=300, description="At most this many of the latest messages.")
    errors_only: bool = Field(False, description="Only errors, page errors (uncaught exceptions) and crashes.")
    clear: bool = Field(False, description="Forget the messages after returning them.")


# -- tool results ------------------------------------------------------------------------


class PageResult(BaseModel):
    """Where the session is: every browser result carries the active tab's URL and title."""

    url: str | None = Field(None, description="URL of the active tab.")
    title: str | None = Field(None, description="Title of the active tab.")
    tab: int | None = Field(None, description="Index of the active tab (when there are several).")
    tab_count: int | None = Field(None, description="Number of open tabs (when there are several).")
    note: str | None = Field(None, description="Anything the model should know about this result.")


class NavigateResult(PageResult):
    status: int | None = Field(None, description="HTTP status of the main document (None for data:/about:).")


class MoveResult(PageResult):
    moved: bool = Field(description="Whether the history moved.")


class SnapshotResult(PageResult):
    snapshot: str = Field(description="The accessibility tree with element refs.")
    truncated: bool = False


class ScreenshotResult(PageResult):
    width: int
    height: int
    format: str
    scale: float = 1.0


class TextResult(PageResult):
    text: str
    truncated: bool = False


class EvaluateResult(PageResult):
    result: Any = Field(None, description="The script's value as JSON (a string when truncated).")
    truncated: bool = False


class ConsoleEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str
    url: str | None = None
    time: float


class Download(BaseModel):
    file: str
    path: str
    url: str
    size: int | None = None
    error: str | None = None


class ConsoleResult(PageResult):
    messages: list[ConsoleEntry]
    older_dropped: int = 0
    downloads: list[Download] = Field(default_factory=list)


class ActionResult(PageResult):
    selected: list[str] | None = Field(None, description="select_option: the values now selected.")


class ScrollPosition(BaseModel):
    x: float
    y: float
    page_width: float
    page_height: float


class ScrollResult(PageResult):
    scroll: ScrollPosition


class TabInfo(BaseModel):
    index: int
    url: str
    title: str
    active: bool


class TabsResult(PageResult):
    tabs: list[TabInfo]


class DownloadsResult(BaseModel):
    directory: str
    downloads: list[Download]
