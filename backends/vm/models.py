"""The vm backend's models: session config, backend-wide settings, tool arguments and results.

Their JSON Schemas are what an LLM reads.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MIN_SIZE = (320, 200)
MAX_SIZE = (7680, 4320)

Point = tuple[int, int]
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
#: Variables the desktop sets itself: a session changing them would only lose its display.
_RESERVED_ENV = frozenset({"DISPLAY", "XAUTHORITY"})


def _check_size(value: tuple[int, int], what: str) -> tuple[int, int]:
    width, height = value
    if not (MIN_SIZE[0] <= width <= MAX_SIZE[0] and MIN_SIZE[1] <= height <= MAX_SIZE[1]):
        raise ValueError(
            f"{what} {width}x{height} is out of range: width {MIN_SIZE[0]}..{MAX_SIZE[0]}, "
            f"height {MIN_SIZE[1]}..{MAX_SIZE[1]} (e.g. [1280, 800] or [1920, 1080])"
        )
    return value


class Config(BaseModel):
    """Session config of `vm`: one virtual desktop."""

    model_config = ConfigDict(extra="forbid")

    screen_size: tuple[int, int] = Field(
        (1280, 800), description="Screen [width, height] in pixels, e.g. [1920, 1080]."
    )
    scale_to: tuple[int, int] | None = Field(
        None,
        description="Scale screenshots down to fit [width, height] (aspect kept, never up); "
        "coordinates given to tools are then in screenshot pixels and mapped back to the screen.",
    )
    startup: list[str | list[str]] = Field(
        default_factory=list,
        description="Programs to start on the desktop when the session starts, each a command line "
        "or an argv list, e.g. ['xterm'].",
    )
    window_manager: Literal["openbox", "none"] = Field(
        "openbox", description="Window manager giving windows focus and decorations."
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment for launched programs (they start from a minimal one: "
        "PATH, HOME, DISPLAY, XAUTHORITY, LANG, TMPDIR, XDG dirs).",
    )
    png_compression: int = Field(
        3, ge=0, le=9, description="PNG compression level of screenshots: 1 fastest, 9 smallest."
    )
    show_cursor: bool = Field(False, description="Draw the mouse pointer into screenshots.")
    provider: Literal["xvfb"] = Field("xvfb", description="Where the desktop runs (today: a local Xvfb).")
    start_timeout: float = Field(15.0, gt=0, le=120, description="Seconds allowed for the desktop to start.")

    @field_validator("screen_size")
    @classmethod
    def _screen_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        return _check_size(value, "screen_size")

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _ENV_NAME.match(name):
                raise ValueError(f"environment variable name {name[:40]!r} is not valid (letters, digits, '_')")
            if name in _RESERVED_ENV:
                raise ValueError(f"{name} is set by the desktop itself and cannot be changed")
            if "\0" in text or len(text) > 8192:
                raise ValueError(f"environment variable {name} must be at most 8192 characters, without NUL")
        return value

    @field_validator("scale_to")
    @classmethod
    def _scale_to(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        return None if value is None else _check_size(value, "scale_to")


class Settings(BaseModel):
    """Backend-wide settings of `vm` (manifest `resources.vm.settings`; clients cannot change them)."""

    model_config = ConfigDict(extra="forbid")

    xvfb: str = Field("Xvfb", description="The Xvfb program (name on PATH or absolute path).")
    display_base: int = Field(
        100, ge=1, le=30000, description="First X display number given to desktops (numbers below stay free)."
    )
    display_count: int = Field(1000, ge=1, le=30000, description="How many display numbers desktops may use.")


_X = "Horizontal position in screenshot pixels (0 = left edge). Omit to keep the pointer's current x."
_Y = "Vertical position in screenshot pixels (0 = top edge). Omit to keep the pointer's current y."
_HOLD = "Keys held down during the action, e.g. ['ctrl'] for ctrl+click, ['shift'] to extend a selection."


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ClickArgs(_Args):
    x: int | None = Field(None, description=_X)
    y: int | None = Field(None, description=_Y)
    button: Literal["left", "middle", "right"] = Field("left", description="Mouse button.")
    clicks: int = Field(1, ge=1, le=3, description="1 = click, 2 = double click, 3 = triple click.")
    hold_keys: list[str] = Field(default_factory=list, description=_HOLD)


class PointArgs(_Args):
    x: int | None = Field(None, description=_X)
    y: int | None = Field(None, description=_Y)
    hold_keys: list[str] = Field(default_factory=list, description=_HOLD)


class MoveArgs(_Args):
    x: int = Field(description="Horizontal position in screenshot pixels (0 = left edge).")
    y: int = Field(description="Vertical position in screenshot pixels (0 = top edge).")


class DragArgs(_Args):
    start: Point = Field(alias="from", description="[x, y] where the button is pressed.")
    end: Point = Field(alias="to", description="[x, y] where the button is released.")
    button: Literal["left", "middle", "right"] = Field("left", description="Mouse button held.")
    steps: int = Field(10, ge=1, le=200, description="Intermediate pointer moves between the two points.")


class ScrollArgs(_Args):
    x: int | None = Field(None, description=_X + " The pointer moves there first.")
    y: int | None = Field(None, description=_Y + " The pointer moves there first.")
    direction: Literal["up", "down", "left", "right"] = Field("down", description="Scroll direction.")
    amount: int = Field(3, ge=1, le=50, description="Number of wheel notches (about 3 lines each).")
    hold_keys: list[str] = Field(default_factory=list, description=_HOLD + " ['ctrl'] often zooms.")


class TypeArgs(_Args):
    text: str = Field(
        description="Text to type into the focused window. Any Unicode; '\\n' presses Enter, "
        "'\\t' Tab. Use the key or hotkey tool for shortcuts."
    )


class HotkeyArgs(_Args):
    keys: list[str] | str = Field(
        description="Keys pressed together, modifiers first: ['ctrl', 'l'], ['ctrl', 'shift', 't'], "
        "['alt', 'f4'], or a string 'ctrl+l'."
    )


class KeyArgs(_Args):
    name: str = Field(
        description="Key to press: 'enter', 'esc', 'tab', 'backspace', 'delete', 'up', 'pagedown', "
        "'f5', 'space', a single character, an X keysym name ('KP_Enter'), or a combination 'ctrl+c'."
    )
    repeat: int = Field(1, ge=1, le=100, description="How many times to press it.")


class LaunchArgs(_Args):
    command: str | list[str] = Field(
        description="Program to start on the desktop: a command line such as 'xterm -fa Mono' "
        "(split like a shell would, but no pipes or redirections) or an argv list. "
        "For shell syntax use ['sh', '-c', '...']."
    )
    wait_for_window: bool = Field(True, description="Wait until the program opens a window.")
    timeout: float = Field(10.0, ge=0, le=120, description="Seconds to wait for the window.")

    @field_validator("command")
    @classmethod
    def _bounded(cls, value: str | list[str]) -> str | list[str]:
        size = len(value) if isinstance(value, str) else sum(len(a) for a in value)
        if size > 65536:
            raise ValueError(f"command is {size} characters; at most 65536")
        return value


class WaitArgs(_Args):
    seconds: float = Field(1.0, ge=0, le=60, description="Seconds to wait (e.g. for a program to load).")
    screenshot: bool = Field(False, description="Take a screenshot after waiting.")


# -- results ---------------------------------------------------------------------------


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PointResult(_Result):
    x: int = Field(description="Horizontal position in screenshot pixels.")
    y: int = Field(description="Vertical position in screenshot pixels.")


class ClickResult(PointResult):
    button: str
    clicks: int


class DragResult(_Result):
    start: Point = Field(alias="from", serialization_alias="from")
    end: Point = Field(alias="to", serialization_alias="to")
    button: str


class ScrollResult(PointResult):
    direction: str
    amount: int


class TypeResult(_Result):
    typed: int = Field(description="Characters typed.")


class HotkeyResult(_Result):
    keys: list[str]


class KeyResult(_Result):
    key: str
    repeat: int


class ScreenshotResult(_Result):
    width: int = Field(description="Screenshot width: the x range every tool takes.")
    height: int = Field(description="Screenshot height: the y range every tool takes.")
    scale: float = Field(description="Screenshot pixels per screen pixel (1.0 unless scale_to is set).")
    screen_width: int
    screen_height: int
    cursor: PointResult
    active_window: str | None = Field(description="Title of the focused window.")
    format: Literal["png", "jpeg"]
    bytes: int
    note: str | None = None


class WindowInfo(_Result):
    id: int
    title: str | None


class LaunchResult(_Result):
    pid: int = Field(description="Host process id of the program (of its sandbox wrapper when sandboxed).")
    command: list[str]
    window: WindowInfo | None = Field(description="The window it opened, if it was awaited and appeared.")
    exit_code: int | None = None
    output: str | None = Field(None, description="The start of what the program printed (at most 200 characters).")
    note: str | None = None


class WaitResult(_Result):
    waited: float = Field(description="Seconds waited.")
    screenshot: ScreenshotResult | None = None
