"""The `vm` backend: a virtual desktop per session, seen through screenshots, driven by mouse and keyboard.

A session owns a `Desktop` (from a `DisplayProvider`; today a local Xvfb and openbox),
an XTEST input connection and an mss screenshot connection to it. X calls block, so
they run in a worker thread, one at a time per session (`VMState.x`).
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import anyio
import anyio.to_thread
import mss
from Xlib import error as xerror

from backends.base import Backend, Image, SessionInfo, ToolContext, ToolResult, tool
from backends.vm.capture import Geometry, ScreenCapture, encode_screenshot
from backends.vm.display import Desktop, DesktopSpec, DisplayProvider, LaunchedApp, XvfbProvider
from backends.vm.input import BUTTONS, SCROLL_BUTTONS, XInput
from backends.vm.keys import parse_combo, parse_key, split_combo
from backends.vm.models import (
    ClickArgs,
    Config,
    DragArgs,
    HotkeyArgs,
    KeyArgs,
    LaunchArgs,
    MoveArgs,
    PointArgs,
    ScrollArgs,
    TypeArgs,
    WaitArgs,
)
from session.errors import BackendError, ParameterError, SandboxError, SessionError

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_TYPE_CHARS = 20_000
_CONNECTION_ERRORS = (xerror.ConnectionClosedError, xerror.DisplayError, ConnectionError, mss.ScreenShotError)
STARTUP_WINDOW_WAIT = 5.0
#: After a launched program exits (code 0), how long a window from its children is awaited.
EXITED_WINDOW_GRACE = 2.0

#: Provider factories by `Config.provider`; a new provider is one entry here.
PROVIDERS: dict[str, Callable[[], DisplayProvider]] = {"xvfb": XvfbProvider}


@dataclass(slots=True)
class VMState:
    """One session's desktop and its X connections."""

    desktop: Desktop
    input: XInput
    capture: ScreenCapture
    geometry: Geometry
    png_level: int
    limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(1))

    async def x(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking X call in this session's worker thread, with errors in the spec's terms.

        Raises:
            SessionError: the X server is gone.
            BackendError: the X server refused the request.
        """
        problem = self.desktop.problem()
        if problem:
            raise SessionError(problem)
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        except SandboxError:
            raise
        except _CONNECTION_ERRORS as exc:
            problem = self.desktop.problem()
            if problem or not isinstance(exc, mss.ScreenShotError):
                raise SessionError(problem or f"lost the connection to the X server: {exc}") from exc
            raise BackendError(f"screenshot failed: {exc}") from exc
        except xerror.XError as exc:
            raise BackendError(f"X server error: {exc}") from exc

    def close_connections(self) -> None:
        self.input.close()
        self.capture.close()


class VMBackend(Backend[Config, VMState]):
    """Virtual desktops (X displays) driven by mouse, keyboard and screenshots."""

    description: ClassVar[str] = (
        "A virtual Linux desktop per session: take screenshots to see it, then click, type and press "
        "keys. Coordinates are screenshot pixels, (0, 0) at the top-left. Start programs with launch."
    )
    Config: ClassVar[type[Config]] = Config

    def __init__(self, name: str, defaults: dict[str, Any] | None = None) -> None:
        super().__init__(name, defaults)
        self._providers: dict[str, DisplayProvider] = {}

    # -- lifecycle -------------------------------------------------------------------------

    async def initialize(self, worker_id: str, config: Config) -> VMState:
        width, height = config.screen_size
        spec = DesktopSpec(
            width=width,
            height=height,
            window_manager=None if config.window_manager == "none" else config.window_manager,
            env=dict(config.env),
            label=re.sub(r"[^A-Za-z0-9_.-]", "_", worker_id)[:32] or "worker",
            start_timeout=config.start_timeout,
        )
        desktop = await self._provider(config.provider).start(spec)
        input_conn: XInput | None = None
        capture: ScreenCapture | None = None
        try:
            input_conn = await anyio.to_thread.run_sync(XInput, desktop.display_name)
            capture = await anyio.to_thread.run_sync(
                lambda: ScreenCapture(desktop.display_name, with_cursor=config.show_cursor)
            )
            state = VMState(
                desktop=desktop,
                input=input_conn,
                capture=capture,
                geometry=Geometry.fit(config.screen_size, config.scale_to),
                png_level=config.png_compression,
            )
            for command in config.startup:
                await self._launch(state, _argv(command), wait_for_window=True, window_wait=STARTUP_WINDOW_WAIT)
        except BaseException:
            with anyio.CancelScope(shield=True):
                for conn in (input_conn, capture):
                    if conn is not None:
                        await anyio.to_thread.run_sync(conn.close)
                await desktop.aclose()
            raise
        return state

    async def cleanup(self, worker_id: str, session_info: SessionInfo) -> None:
        state: VMState = session_info.state
        with anyio.CancelScope(shield=True):
            # Stop the display first: closing a connection to a hung server could block.
            try:
                await state.desktop.aclose()
            finally:
                await anyio.to_thread.run_sync(state.close_connections)

    def describe(self, state: VMState) -> dict[str, Any]:
        desktop = state.desktop
        return {
            "display": desktop.display_name,
            "pids": desktop.pids(),
            "screen_size": [state.geometry.screen_width, state.geometry.screen_height],
        }

    async def health(self, state: VMState) -> str | None:
        return state.desktop.problem()

    def _provider(self, name: str) -> DisplayProvider:
        if name not in self._providers:
            self._providers[name] = PROVIDERS[name]()
        return self._providers[name]

    # -- seeing ----------------------------------------------------------------------------

    @tool(read_only=True)
    async def screenshot(self, ctx: ToolContext[VMState]) -> ToolResult:
        """Capture the whole screen as a PNG image.

        Returns the image plus width/height (the coordinate space every other tool uses),
        the pointer position and the focused window's title. Take one before acting and
        after anything that changes the screen.
        """
        return await _screenshot(ctx.state)

    @tool(read_only=True)
    async def cursor_position(self, ctx: ToolContext[VMState]) -> dict[str, Any]:
        """Where the mouse pointer is, in screenshot pixels."""
        state = ctx.state
        x, y = state.geometry.to_model(*await state.x(state.input.pointer))
        return {"x": x, "y": y}

    # -- mouse -----------------------------------------------------------------------------

    @tool()
    async def click(self, ctx: ToolContext[VMState], args: ClickArgs) -> dict[str, Any]:
        """Click a mouse button at (x, y) in screenshot pixels.

        Omitting x or y keeps the pointer's current position on that axis. `clicks=2`
        double-clicks; `hold_keys` holds keys during the click (e.g. ['ctrl']).
        """
        return await _click(ctx.state, args.x, args.y, args.button, args.clicks, args.hold_keys)

    @tool()
    async def double_click(self, ctx: ToolContext[VMState], args: PointArgs) -> dict[str, Any]:
        """Double-click the left button at (x, y) in screenshot pixels (e.g. to open a file)."""
        return await _click(ctx.state, args.x, args.y, "left", 2, args.hold_keys)

    @tool()
    async def right_click(self, ctx: ToolContext[VMState], args: PointArgs) -> dict[str, Any]:
        """Right-click at (x, y) in screenshot pixels, usually to open a context menu."""
        return await _click(ctx.state, args.x, args.y, "right", 1, args.hold_keys)

    @tool()
    async def move(self, ctx: ToolContext[VMState], args: MoveArgs) -> dict[str, Any]:
        """Move the mouse pointer to (x, y) in screenshot pixels without clicking (e.g. to hover)."""
        state = ctx.state
        sx, sy = state.geometry.to_screen(args.x, args.y)
        await state.x(state.input.move, sx, sy)
        return {"x": args.x, "y": args.y}

    @tool()
    async def drag(self, ctx: ToolContext[VMState], args: DragArgs) -> dict[str, Any]:
        """Press a mouse button at `from`, move to `to`, release there (drag and drop, select, resize)."""
        state = ctx.state
        x0, y0 = state.geometry.to_screen(*args.start)
        x1, y1 = state.geometry.to_screen(*args.end)
        path = [
            (round(x0 + (x1 - x0) * i / args.steps), round(y0 + (y1 - y0) * i / args.steps))
            for i in range(args.steps + 1)
        ]
        await state.x(state.input.drag, path, BUTTONS[args.button], 0.01)
        return {"from": list(args.start), "to": list(args.end), "button": args.button}

    @tool()
    async def scroll(self, ctx: ToolContext[VMState], args: ScrollArgs) -> dict[str, Any]:
        """Scroll the mouse wheel at (x, y) in screenshot pixels (omitted: where the pointer is)."""
        state = ctx.state
        hold = [parse_key(k, in_combo=True) for k in args.hold_keys]
        sx, sy = await _target(state, args.x, args.y)
        await state.x(state.input.scroll, sx, sy, SCROLL_BUTTONS[args.direction], args.amount, hold)
        x, y = state.geometry.to_model(sx, sy)
        return {"x": x, "y": y, "direction": args.direction, "amount": args.amount}

    # -- keyboard --------------------------------------------------------------------------

    @tool(name="type")
    async def type_(self, ctx: ToolContext[VMState], args: TypeArgs) -> dict[str, Any]:
        """Type text into the focused window, as if on a keyboard.

        Click the target field first. Any Unicode works; '\\n' presses Enter. For
        shortcuts (ctrl+c) use hotkey; for single special keys use key.
        """
        text = args.text
        if not text:
            raise ParameterError("text is empty: pass the characters to type, e.g. {'text': 'hello'}")
        if len(text) > MAX_TYPE_CHARS:
            raise ParameterError(f"text is {len(text)} characters; type at most {MAX_TYPE_CHARS} per call (split it)")
        for index, char in enumerate(text):
            if (ord(char) < 0x20 and char not in "\n\r\t") or ord(char) == 0x7F:
                raise ParameterError(
                    f"text contains control character U+{ord(char):04X} at position {index}; "
                    "remove it, or use the key tool (e.g. 'esc')"
                )
        await ctx.state.x(ctx.state.input.type_text, text.replace("\r\n", "\n"))
        return {"typed": len(text)}

    @tool()
    async def hotkey(self, ctx: ToolContext[VMState], args: HotkeyArgs) -> dict[str, Any]:
        """Press a key combination: modifiers held in order, the last key tapped, all released.

        E.g. ['ctrl', 'l'], ['ctrl', 'shift', 't'], ['alt', 'f4'], or 'ctrl+c'.
        """
        keysyms = parse_combo(args.keys)
        await ctx.state.x(ctx.state.input.press_combo, keysyms)
        return {"keys": split_combo(args.keys)}

    @tool()
    async def key(self, ctx: ToolContext[VMState], args: KeyArgs) -> dict[str, Any]:
        """Press and release one key ('enter', 'esc', 'tab', 'f5', 'pagedown') or a combination ('ctrl+a')."""
        keysyms = parse_combo(args.name)
        await ctx.state.x(ctx.state.input.press_combo, keysyms, args.repeat)
        return {"key": args.name, "repeat": args.repeat}

    # -- programs and time -----------------------------------------------------------------

    @tool(open_world=True)
    async def launch(self, ctx: ToolContext[VMState], args: LaunchArgs) -> dict[str, Any]:
        """Start a program on the desktop (e.g. 'xterm'), and by default wait for its window.

        Returns the process id and the new window's title. The program runs until the
        session ends or it exits.
        """
        return await self._launch(ctx.state, _argv(args.command), args.wait_for_window, args.timeout)

    @tool(read_only=True)
    async def wait(self, ctx: ToolContext[VMState], args: WaitArgs) -> dict[str, Any] | ToolResult:
        """Wait some seconds (e.g. for a program to load), optionally taking a screenshot afterwards."""
        await anyio.sleep(args.seconds)
        if args.screenshot:
            result = await _screenshot(ctx.state)
            assert isinstance(result.data, dict)
            result.data["waited"] = args.seconds
            return result
        return {"waited": args.seconds}

    async def _launch(
        self, state: VMState, argv: list[str], wait_for_window: bool, window_wait: float
    ) -> dict[str, Any]:
        before = set(await state.x(state.input.client_windows)) if wait_for_window else set()
        app = await state.desktop.launch(argv)
        result: dict[str, Any] = {"pid": app.pid, "command": argv, "window": None}
        if not wait_for_window:
            return result
        window = await _new_window(state, app, before, window_wait)
        if window is None and app.returncode is not None:
            result["exit_code"] = app.returncode
            result["note"] = f"the program exited (code {app.returncode}) without opening a window"
            if app.log_tail():
                result["output"] = app.log_tail()
        elif window is None:
            result["note"] = f"no new window appeared within {window_wait:g} s; the program is still running"
        else:
            result["window"] = {"id": window, "title": await state.x(state.input.window_title, window)}
        return result


# -- helpers -------------------------------------------------------------------------------


def _argv(command: str | list[str]) -> list[str]:
    if isinstance(command, str):
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise ParameterError(f"cannot parse command {command!r}: {exc}") from None
    else:
        argv = [str(a) for a in command]
    if not argv or not argv[0]:
        raise ParameterError("command is empty: give a program to start, e.g. 'xterm'")
    return argv


def _check_exit(app: LaunchedApp) -> None:
    code = app.returncode
    if code is not None and code != 0:
        raise BackendError(f"{app.argv[0]} exited with code {code}: {app.log_tail() or 'no output'}")


async def _target(state: VMState, x: int | None, y: int | None) -> tuple[int, int]:
    """Screen point for model (x, y); an omitted axis keeps the pointer's current position."""
    if x is not None and y is not None:
        return state.geometry.to_screen(x, y)
    px, py = await state.x(state.input.pointer)
    mx, my = state.geometry.to_model(px, py)
    sx, sy = state.geometry.to_screen(mx if x is None else x, my if y is None else y)
    return (px if x is None else sx, py if y is None else sy)


async def _click(
    state: VMState, x: int | None, y: int | None, button: str, clicks: int, hold_keys: list[str]
) -> dict[str, Any]:
    hold = [parse_key(k, in_combo=True) for k in hold_keys]
    sx, sy = await _target(state, x, y)
    await state.x(state.input.click, sx, sy, BUTTONS[button], clicks, hold)
    mx, my = state.geometry.to_model(sx, sy)
    return {"x": mx, "y": my, "button": button, "clicks": clicks}


async def _screenshot(state: VMState) -> ToolResult:
    geometry = state.geometry

    def capture() -> tuple[bytes, str, tuple[int, int], str | None]:
        encoded, fmt = encode_screenshot(state.capture.grab(geometry), state.png_level)
        return encoded, fmt, state.input.pointer(), state.input.active_window_title()

    encoded, fmt, pointer, title = await state.x(capture)
    cx, cy = geometry.to_model(*pointer)
    data = {
        "width": geometry.width,
        "height": geometry.height,
        "scale": round(geometry.scale, 6),
        "screen_width": geometry.screen_width,
        "screen_height": geometry.screen_height,
        "cursor": {"x": cx, "y": cy},
        "active_window": title,
        "format": fmt,
        "bytes": len(encoded),
    }
    if fmt != "png":
        data["note"] = "a PNG of this screen would be too large to send; this is a JPEG (same coordinates)"
    return ToolResult(data=data, images=[Image(encoded, f"image/{fmt}")])


async def _new_window(state: VMState, app: LaunchedApp, before: set[int], window_wait: float) -> int | None:
    """The first window that appears after `before`, once mapped and focused (so typing lands).

    Raises:
        BackendError: the program exited with an error before opening a window.
    """
    window = None
    deadline = anyio.current_time() + window_wait
    exited_at: float | None = None
    with anyio.move_on_after(window_wait):
        while window is None:
            new = [w for w in await state.x(state.input.client_windows) if w not in before]
            if new:
                window = new[-1]
                break
            _check_exit(app)
            if app.returncode == 0:
                # A launcher may exit at once and leave a window to a child: give it a moment.
                exited_at = exited_at or anyio.current_time()
                if anyio.current_time() - exited_at > EXITED_WINDOW_GRACE:
                    break
            await anyio.sleep(0.05)
    if window is None:
        _check_exit(app)
        return None
    # On a busy machine the window manager may take a while to focus it.
    with anyio.move_on_after(max(1.0, min(5.0, deadline - anyio.current_time()))):
        while True:
            if await state.x(state.input.window_ready, window):
                break
            await anyio.sleep(0.02)
    return window
