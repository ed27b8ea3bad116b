"""Argument models of the browser tools (their JSON Schema is what an LLM reads)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

REF = "Element ref from the latest snapshot, e.g. 'e12'."
SELECTOR = "CSS or Playwright selector (e.g. '#login', 'text=Sign in'), if you have no ref."


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Target(_Args):
    ref: str | None = Field(None, description=REF)
    selector: str | None = Field(None, description=SELECTOR)

    @model_validator(mode="after")
    def _one_target(self) -> _Target:
        if self.ref and self.selector:
            raise ValueError("pass either ref or selector, not both")
        return self


class NavigateArgs(_Args):
    url: str = Field(
        description="Absolute URL to open (http, https, data:, about:). A bare host like 'example.com' "
        "gets https:// (http:// for localhost)."
    )
    wait_until: Literal["load", "domcontentloaded", "networkidle", "commit"] = Field(
        "load", description="When the navigation counts as done."
    )
    timeout_ms: int | None = Field(None, ge=100, le=300_000, description="Override the navigation timeout.")


class SnapshotArgs(_Target):
    ref: str | None = Field(None, description="Only the subtree at this ref (default: the whole page).")
    selector: str | None = Field(None, description="Only the subtree at this selector.")
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
    text: str = Field(description="Text to enter.")
    submit: bool = Field(False, description="Press Enter afterwards (submits most forms).")
    clear: bool = Field(True, description="Replace the field's content (false: append, typing key by key).")


class PressArgs(_Target):
    key: str = Field(description="Key or chord: 'Enter', 'Tab', 'Escape', 'ArrowDown', 'Control+A', 'Shift+Tab'.")
    ref: str | None = Field(None, description="Focus this element first (default: whatever has focus).")


class HoverArgs(_Target):
    pass


class SelectOptionArgs(_Target):
    values: list[str] = Field(min_length=1, description="Option values or visible labels to select.")


class ScrollArgs(_Target):
    direction: Literal["down", "up", "left", "right"] = Field("down", description="Which way to scroll.")
    amount: int | None = Field(None, ge=1, le=100_000, description="Pixels to scroll (default: most of the viewport).")
    ref: str | None = Field(None, description="Scroll this element into view instead.")


class WaitForArgs(_Args):
    text: str | None = Field(None, description="Wait until this text is visible.")
    text_gone: str | None = Field(None, description="Wait until this text is no longer visible.")
    selector: str | None = Field(None, description="Wait until an element matching this selector is visible.")
    seconds: float | None = Field(None, gt=0, le=30, description="Just wait this long.")
    timeout_ms: int = Field(10_000, ge=100, le=60_000, description="Give up after this long.")

    @model_validator(mode="after")
    def _one_condition(self) -> WaitForArgs:
        given = [v for v in (self.text, self.text_gone, self.selector, self.seconds) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of: text, text_gone, selector, seconds")
        return self


class ScreenshotArgs(_Target):
    ref: str | None = Field(None, description="Capture only this element.")
    selector: str | None = Field(None, description="Capture only the element matching this selector.")
    full_page: bool = Field(False, description="Capture the whole scrollable page, not just the viewport.")


class GetTextArgs(_Target):
    ref: str | None = Field(None, description="Text of this element only.")
    selector: str | None = Field(None, description="Text of the element matching this selector only.")
    max_chars: int = Field(20_000, ge=100, le=200_000, description="Cut the text after this many characters.")


class EvaluateArgs(_Args):
    expression: str = Field(
        description="JavaScript expression or function, e.g. 'document.title' or "
        "'() => [...document.links].map(a => a.href)'. With `ref`, a function receiving the element: "
        "'el => el.value'. Promises are awaited."
    )
    ref: str | None = Field(None, description=REF)
    timeout_ms: int = Field(10_000, ge=100, le=60_000, description="Give up (and close a stuck tab) after this long.")
    max_chars: int = Field(20_000, ge=100, le=200_000, description="Cut a larger JSON result.")


class TabsArgs(_Args):
    action: Literal["list", "new", "select", "close"] = Field("list", description="What to do.")
    index: int | None = Field(None, ge=0, description="Tab index for select/close (close: default active tab).")
    url: str | None = Field(None, description="URL to open in the new tab (action='new').")

    @model_validator(mode="after")
    def _needs_index(self) -> TabsArgs:
        if self.action == "select" and self.index is None:
            raise ValueError("action='select' needs index")
        return self


class ConsoleArgs(_Args):
    limit: int = Field(50, ge=1, le=300, description="At most this many of the latest messages.")
    errors_only: bool = Field(False, description="Only errors, page errors (uncaught exceptions) and crashes.")
    clear: bool = Field(False, description="Forget the messages after returning them.")
