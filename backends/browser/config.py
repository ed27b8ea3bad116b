"""Configuration of the browser backend: backend-wide launch settings and per-session config.

Backend-wide settings (one Chromium per server) come from the manifest's
`resources.browser.config` only; everything else there is a default that each session's
own config is merged over (`BrowserConfig`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_EXECUTABLE = "/usr/bin/chromium"

# The flags that keep Debian's Chromium quiet and stable in a small VM or container:
# no sandbox (we may run as root), no GPU, no background traffic, no /dev/shm (64 MiB
# /dev/shm in containers crashes renderers).
CHROMIUM_ARGS: tuple[str, ...] = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--disable-dev-shm-usage",
)


class LaunchSettings(BaseModel):
    """How the shared browser is launched (manifest-only; a session cannot change these)."""

    model_config = ConfigDict(extra="forbid")

    executable_path: str = Field(
        DEFAULT_EXECUTABLE,
        description="Chromium binary. Debian's `chromium` package; Playwright's own download is not used.",
    )
    launch_args: list[str] = Field(default_factory=list, description="Extra Chromium command-line flags.")
    launch_timeout_ms: int = Field(30_000, ge=1_000, description="How long a browser launch may take.")
    max_image_bytes: int = Field(
        1024 * 1024, ge=64 * 1024, description="Screenshots above this size are re-encoded or clipped."
    )


class BrowserConfig(BaseModel):
    """One session's browser context."""

    model_config = ConfigDict(extra="forbid")

    viewport: tuple[int, int] = Field(
        (1280, 800), description="Viewport [width, height] in CSS pixels; screenshots have this size."
    )
    user_agent: str | None = Field(None, description="User-Agent header and navigator.userAgent.")
    locale: str | None = Field(None, description="Locale such as 'en-US' or 'de-DE'.")
    timezone: str | None = Field(None, description="IANA time zone such as 'Europe/Berlin'.")
    extra_headers: dict[str, str] = Field(default_factory=dict, description="HTTP headers sent with every request.")
    storage_state: dict[str, Any] | None = Field(
        None,
        description="Cookies and localStorage to start with (Playwright storage-state object: "
        "{'cookies': [...], 'origins': [...]}), e.g. to start logged in.",
    )
    headless: bool = Field(
        True,
        description="False shows the pages on an X display (`display`, e.g. a vm session's ':1'). "
        "Headed contexts share one headed Chromium per display.",
    )
    display: str | None = Field(None, description="X display for headless=false; defaults to $DISPLAY.")
    block: list[str] = Field(
        default_factory=list,
        description="URL glob patterns to refuse, matched against the full URL ('*' matches anything), "
        "e.g. '*://ads.example.com/*' or '*.mp4'.",
    )
    allow_file_urls: bool = Field(False, description="Allow file:// URLs (host files). Off by default.")
    ignore_https_errors: bool = Field(False, description="Accept invalid TLS certificates.")
    timeout_ms: int = Field(5_000, ge=100, le=120_000, description="Default timeout of element actions.")
    navigation_timeout_ms: int = Field(30_000, ge=100, le=300_000, description="Default navigation timeout.")
    dialogs: Literal["accept", "dismiss"] = Field(
        "accept", description="What to do with alert/confirm/prompt dialogs (each is logged to console)."
    )

    @field_validator("viewport")
    @classmethod
    def _sane_viewport(cls, value: tuple[int, int]) -> tuple[int, int]:
        width, height = value
        if not (100 <= width <= 7680 and 100 <= height <= 4320):
            raise ValueError("viewport must be [width, height] with 100 <= width <= 7680, 100 <= height <= 4320")
        return value

    @field_validator("display")
    @classmethod
    def _sane_display(cls, value: str | None) -> str | None:
        if value is not None and not value.lstrip().startswith(":") and ":" not in value:
            raise ValueError("display looks like ':1' (or 'host:1')")
        return value
