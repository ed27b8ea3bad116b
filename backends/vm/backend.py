"""The `vm` backend: a virtual desktop per session, seen through screenshots, driven by mouse and keyboard.

A session owns a `Desktop` (from a `DisplayProvider`; today Xvfb and openbox, inside the
session's sandbox unless the operator's policy says `none`) and one X connection to it
for XTEST input and screenshots. X calls block, so they run in a worker thread, one at a
time per session (`VMState.x`). The backend instance owns what its desktops share: the
display numbers and the providers; each desktop keeps its own cookie.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import anyio
import anyio.to_thread
from pydantic import BaseModel
from Xlib import error as xerror

from backends.base import Backend, Image, Runtime, SessionSetup, ToolContext, ToolResult, tool
from backends.policy import Policy
from backends.vm.allocator import DisplayAllocator
from backends.vm.capture import Geometry, ScreenCapture, encode_screenshot
from backends.vm.display import (
    OUTPUT_ECHO_CHARS,
    Desktop,
    DesktopSpec,
    DisplayProvider,
    LaunchedApp,
    XvfbProvider,
    prepare_dirs,
)
from backends.vm.input import BUTTONS, SCROLL_BUTTONS, XInput
from backends.vm.keys import parse_combo, parse_key, split_combo
from backends.vm.models import (
    ClickArgs,
    ClickResult,
    DragArgs,
    DragResult,
    HotkeyArgs,
    HotkeyResult,
    KeyArgs,
    KeyResult,
    LaunchArgs,
    LaunchResult,
    MoveArgs,
    PointArgs,
    PointResult,
    ScreenshotResult,
    ScrollArgs,
    ScrollResult,
    TypeArgs,
    TypeResult,
    WaitArgs,
    WaitResult,
    WindowInfo,
)
from backends.vm.models import Config as VMConfig
from backends.vm.models import Settings as VMSettings
from backends.vm.runner import HostPaths, Runner
from session.errors import BackendError, ConfigurationError, ParameterError, SandboxError, SessionError

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_TYPE_CHARS = 20_000
_CONNECTION_ERRORS = (xerror.ConnectionClosedError, xerror.DisplayError, ConnectionError)  # incl. GrabError
STARTUP_WINDOW_WAIT = 5.0
#: After a launched program exits (code 0), how long a window from its children is awaited.
EXITED_WINDOW_GRACE = 2.0
JPEG_NOTE = "a PNG of this screen would be too large to send; this is a JPEG (same coordinates)"
#: A launch result echoes at most this many arguments of the command.
ECHO_ARGS = 20

#: Provider factories by `Config.provider`; a new provider is one entry here.
PROVIDERS: dict[str, Callable[[VMSettings, DisplayAllocator], DisplayProvider]] = {
    "xvfb": lambda settings, allocator: XvfbProvider(allocator, xvfb=settings.xvfb),
}


@dataclass(slots=True)
class VMState:
    """One session's desktop and its X connection."""

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
            raise SessionError(self.desktop.problem() or f"lost the connection to the X server: {exc}") from exc
        except xerror.XError as exc:
            raise BackendError(f"X server error: {exc}") from exc

    def close_connections(self) -> None:
        self.capture.close()
        self.input.close()


VMContext = ToolContext[VMConfig, VMState]


class VMBackend(Backend[VMConfig, VMState]):
    """Virtual desktops (X displays) driven by mouse, keyboard and screenshots."""

    description: ClassVar[str] = (
        "A virtual Linux desktop per session: take screenshots to see it, then click, type and press "
        "keys. Coordinates are screenshot pixels, (0, 0) at the top-left. Start programs with launch."
    )
    Config: ClassVar[type[BaseModel]] = VMConfig
    Settings: ClassVar[type[BaseModel]] = VMSettings
    #: The server's own XTEST/screenshot connection must reach the X socket, which gVisor's
    #: separate kernel does not share with the host: desktops run in the `sandbox` tier.
    isolation_tiers: ClassVar[frozenset[str]] = frozenset({"none", "sandbox"})

    settings: VMSettings

    def __init__(
        self,
        name: str,
        *,
        settings: dict[str, Any] | None = None,
        defaults: dict[str, Any] | None = None,
        policy: Policy | None = None,
        runtime: Runtime,
    ) -> None:
        super().__init__(name, settings=settings, defaults=defaults, policy=policy, runtime=runtime)
        self.displays = DisplayAllocator(self.settings.display_base, self.settings.display_count)
        self._providers: dict[str, DisplayProvider] = {}

    # -- lifecycle -------------------------------------------------------------------------

    async def initialize(self, setup: SessionSetup[VMConfig]) -> VMState:
        config = setup.config
        paths = HostPaths.under(setup.scratch)
        await anyio.to_thread.run_sync(prepare_dirs, paths)
        runner = await self._runner(setup, paths)
        width, height = config.screen_size
        spec = DesktopSpec(
            width=width,
            height=height,
            window_manager=None if config.window_manager == "none" else config.window_manager,
            env=dict(config.env),
            label=setup.label,
            start_timeout=config.start_timeout,
        )
        try:
            desktop = await self._provider(config.provider).start(spec, runner, paths)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await runner.aclose()
            raise
        input_conn: XInput | None = None
        capture: ScreenCapture | None = None
        try:
            input_conn = await anyio.to_thread.run_sync(XInput, desktop.endpoint)
            capture = await anyio.to_thread.run_sync(
                lambda: ScreenCapture(desktop.endpoint, input_conn.display, with_cursor=config.show_cursor)
            )
            state = VMState(
                desktop=desktop,
                input=input_conn,
                capture=capture,
                geometry=Geometry.fit(config.screen_size, config.scale_to),
                png_level=config.png_compression,
            )
            for command in config.startup:
                # A startup program gets as long as the desktop itself to show its window: on a
                # loaded machine an xterm can take seconds, and keys typed before it maps are lost.
                wait = max(STARTUP_WINDOW_WAIT, config.start_timeout)
                await self._launch(state, _argv(command), wait_for_window=True, window_wait=wait)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await desktop.aclose()
                for conn in (capture, input_conn):
                    if conn is not None:
                        await anyio.to_thread.run_sync(conn.close)
            raise
        return state

    async def cleanup(self, setup: SessionSetup[VMConfig], state: VMState) -> None:
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
            "screenshots": state.capture.method,
            "sandbox": desktop.describe(),
        }

    def export(self, state: VMState) -> dict[str, str]:
        """What a browser session needs to show its windows on this desktop (headed mode).

        `display` is the name inside a sandbox that binds `x11_socket_dir` at /tmp/.X11-unix;
        `xauthority` is the desktop's cookie file. Only the engine may hand these to a session
        of the same principal: holding them is holding the desktop.
        """
        return state.desktop.export()

    async def health(self, state: VMState) -> str | None:
        return state.desktop.problem()

    def status(self) -> dict[str, Any]:
        return {"live_displays": len(self.displays.live), "isolation_tiers": sorted(self.isolation_tiers)}

    async def _runner(self, setup: SessionSetup[VMConfig], paths: HostPaths) -> Runner:
        if setup.policy.isolation not in self.isolation_tiers:
            raise ConfigurationError(
                f"vm desktops cannot run under isolation {setup.policy.isolation!r}: the server's own X "
                f"connection must reach the desktop's socket; this backend provides {sorted(self.isolation_tiers)}"
            )
        return await Runner.create(
            label=setup.label, policy=setup.policy, server_id=self.runtime.server_id, paths=paths
        )

    def _provider(self, name: str) -> DisplayProvider:
        if name not in self._providers:
            self._providers[name] = PROVIDERS[name](self.settings, self.displays)
        return self._providers[name]

    # -- seeing ----------------------------------------------------------------------------

    @tool(read_only=True)
    async def screenshot(self, ctx: VMContext) -> ToolResult[ScreenshotResult]:
        """Capture the whole screen as a PNG image.

        Returns the image plus width/height (the coordinate space every other tool uses),
        the pointer position and the focused window's title. Take one before acting and
        after anything that changes the screen.
        """
        return await _screenshot(ctx.state)

    @tool(read_only=True)
    async def cursor_position(self, ctx: VMContext) -> PointResult:
        """Where the mouse pointer is, in screenshot pixels."""
        state = ctx.state
        x, y = state.geometry.to_model(*await state.x(state.input.pointer))
        return PointResult(x=x, y=y)

    # -- mouse -----------------------------------------------------------------------------

    @tool()
    async def click(self, ctx: VMContext, args: ClickArgs) -> ClickResult:
        """Click a mouse button at (x, y) in screenshot pixels.

        Omitting x or y keeps the pointer's current position on that axis. `clicks=2`
        double-clicks; `hold_keys` holds keys during the click (e.g. ['ctrl']).
        """
        return await _click(ctx.state, args.x, args.y, args.button, args.clicks, args.hold_keys)

    @tool()
    async def double_click(self, ctx: VMContext, args: PointArgs) -> ClickResult:
        """Double-click the left button at (x, y) in screenshot pixels (e.g. to open a file)."""
        return await _click(ctx.state, args.x, args.y, "left", 2, args.hold_keys)

    @tool()
    async def right_click(self, ctx: VMContext, args: PointArgs) -> ClickResult:
        """Right-click at (x, y) in screenshot pixels, usually to open a context menu."""
        return await _click(ctx.state, args.x, args.y, "right", 1, args.hold_keys)

    @tool()
    async def move(self, ctx: VMContext, args: MoveArgs) -> PointResult:
        """Move the mouse pointer to (x, y) in screenshot pixels without clicking (e.g. to hover)."""
        state = ctx.state
        sx, sy = state.geometry.to_screen(args.x, args.y)
        await state.x(state.input.move, sx, sy)
        return PointResult(x=args.x, y=args.y)

    @tool()
    async def drag(self, ctx: VMContext, args: DragArgs) -> DragResult:
        """Press a mouse button at `from`, move to `to`, release there (drag and drop, select, resize)."""
        state = ctx.state
        x0, y0 = state.geometry.to_screen(*args.start)
        x1, y1 = state.geometry.to_screen(*args.end)
        path = [
            (round(x0 + (x1 - x0) * i / args.steps), round(y0 + (y1 - y0) * i / args.steps))
            for i in range(args.steps + 1)
        ]
        await state.x(state.input.drag, path, BUTTONS[args.button], 0.01)
        return DragResult(start=args.start, end=args.end, button=args.button)

    @tool()
    async def scroll(self, ctx: VMContext, args: ScrollArgs) -> ScrollResult:
        """Scroll the mouse wheel at (x, y) in screenshot pixels (omitted: where the pointer is)."""
        state = ctx.state
        hold = [parse_key(k, in_combo=True) for k in args.hold_keys]
        sx, sy = await _target(state, args.x, args.y)
        await state.x(state.input.scroll, sx, sy, SCROLL_BUTTONS[args.direction], args.amount, hold)
        x, y = state.geometry.to_model(sx, sy)
        return ScrollResult(x=x, y=y, direction=args.direction, amount=args.amount)

    # -- keyboard --------------------------------------------------------------------------

    @tool(name="type")
    async def type_(self, ctx: VMContext, args: TypeArgs) -> TypeResult:
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
        return TypeResult(typed=len(text))

    @tool()
    async def hotkey(self, ctx: VMContext, args: HotkeyArgs) -> HotkeyResult:
        """Press a key combination: modifiers held in order, the last key tapped, all released.

        E.g. ['ctrl', 'l'], ['ctrl', 'shift', 't'], ['alt', 'f4'], or 'ctrl+c'.
        """
        keysyms = parse_combo(args.keys)
        await ctx.state.x(ctx.state.input.press_combo, keysyms)
        return HotkeyResult(keys=split_combo(args.keys))

    @tool()
    async def key(self, ctx: VMContext, args: KeyArgs) -> KeyResult:
        """Press and release one key ('enter', 'esc', 'tab', 'f5', 'pagedown') or a combination ('ctrl+a')."""
        keysyms = parse_combo(args.name)
        await ctx.state.x(ctx.state.input.press_combo, keysyms, args.repeat)
        return KeyResult(key=args.name, repeat=args.repeat)

    # -- programs and time -----------------------------------------------------------------

    @tool(open_world=True)
    async def launch(self, ctx: VMContext, args: LaunchArgs) -> LaunchResult:
        """Start a program on the desktop (e.g. 'xterm'), and by default wait for its window.

        Returns the process id and the new window's title. The program runs until the
        session ends or it exits. It starts with a minimal environment (PATH, HOME,
        DISPLAY, LANG, ...) plus the session's `env` config.
        """
        return await self._launch(ctx.state, _argv(args.command), args.wait_for_window, args.timeout)

    @tool(read_only=True)
    async def wait(self, ctx: VMContext, args: WaitArgs) -> ToolResult[WaitResult]:
        """Wait some seconds (e.g. for a program to load), optionally taking a screenshot afterwards."""
        await anyio.sleep(args.seconds)
        if not args.screenshot:
            return ToolResult(WaitResult(waited=args.seconds))
        shot = await _screenshot(ctx.state)
        return ToolResult(WaitResult(waited=args.seconds, screenshot=shot.data), images=shot.images)

    async def _launch(self, state: VMState, argv: list[str], wait_for_window: bool, window_wait: float) -> LaunchResult:
        before = set(await state.x(state.input.client_windows)) if wait_for_window else set()
        app = await state.desktop.launch(argv)
        result = LaunchResult(pid=app.pid, command=_echo(argv), window=None)
        if not wait_for_window:
            return result
        window = await _new_window(state, app, before, window_wait)
        if window is None and app.returncode is not None:
            result.exit_code = app.returncode
            result.note = f"the program exited (code {app.returncode}) without opening a window"
            result.output = app.output() or None
        elif window is None:
            result.note = f"no new window appeared within {window_wait:g} s; the program is still running"
        else:
            result.window = WindowInfo(id=window, title=await state.x(state.input.window_title, window))
        return result


# -- helpers -------------------------------------------------------------------------------


def _argv(command: str | list[str]) -> list[str]:
    if isinstance(command, str):
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise ParameterError(f"cannot parse command {command[:OUTPUT_ECHO_CHARS]!r}: {exc}") from None
    else:
        argv = [str(a) for a in command]
    if not argv or not argv[0]:
        raise ParameterError("command is empty: give a program to start, e.g. 'xterm'")
    if any("\0" in a for a in argv):
        raise ParameterError("command arguments must not contain NUL characters")
    return argv


def _echo(argv: list[str]) -> list[str]:
    """The command as a result shows it: a bounded prefix of each of the first arguments."""
    shown = [a[:OUTPUT_ECHO_CHARS] for a in argv[:ECHO_ARGS]]
    if len(argv) > ECHO_ARGS:
        shown.append(f"... ({len(argv) - ECHO_ARGS} more)")
    return shown


def _check_exit(app: LaunchedApp, limits: str = "") -> None:
    code = app.returncode
    if code is not None and code != 0:
        output = app.output()
        if output.startswith("bwrap: execvp"):
            # The sandbox could not start it: a missing or non-executable program, the caller's mistake.
            raise ParameterError(f"program {app.argv[0][:OUTPUT_ECHO_CHARS]!r} could not be started: {output}")
        reason = f" ({limits})" if limits else ""
        raise BackendError(
            f"{app.argv[0][:OUTPUT_ECHO_CHARS]} exited with code {code}{reason}: {output or 'no output'}"
        )


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
) -> ClickResult:
    hold = [parse_key(k, in_combo=True) for k in hold_keys]
    sx, sy = await _target(state, x, y)
    await state.x(state.input.click, sx, sy, BUTTONS[button], clicks, hold)
    mx, my = state.geometry.to_model(sx, sy)
    return ClickResult(x=mx, y=my, button=button, clicks=clicks)


async def _screenshot(state: VMState) -> ToolResult[ScreenshotResult]:
    geometry = state.geometry

    def capture() -> tuple[bytes, str, tuple[int, int], str | None]:
        encoded, fmt = encode_screenshot(state.capture.grab(geometry), state.png_level)
        return encoded, fmt, state.input.pointer(), state.input.active_window_title()

    encoded, fmt, pointer, title = await state.x(capture)
    cx, cy = geometry.to_model(*pointer)
    data = ScreenshotResult(
        width=geometry.width,
        height=geometry.height,
        scale=round(geometry.scale, 6),
        screen_width=geometry.screen_width,
        screen_height=geometry.screen_height,
        cursor=PointResult(x=cx, y=cy),
        active_window=title[:OUTPUT_ECHO_CHARS] if title else title,
        format="png" if fmt == "png" else "jpeg",
        bytes=len(encoded),
        note=None if fmt == "png" else JPEG_NOTE,
    )
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
            _check_exit(app, state.desktop.limits_hit())
            if app.returncode == 0:
                # A launcher may exit at once and leave a window to a child: give it a moment.
                exited_at = exited_at or anyio.current_time()
                if anyio.current_time() - exited_at > EXITED_WINDOW_GRACE:
                    break
            await anyio.sleep(0.05)
    if window is None:
        _check_exit(app, state.desktop.limits_hit())
        return None
    # On a busy machine the window manager may take a while to focus it.
    with anyio.move_on_after(max(1.0, min(5.0, deadline - anyio.current_time()))):
        while True:
            if await state.x(state.input.window_ready, window):
                break
            await anyio.sleep(0.02)
    return window
