"""Mouse and keyboard through the XTEST extension on one X connection.

Every method is synchronous and blocks on X round trips (well under a millisecond on a
local display); the backend calls them in a worker thread, one at a time per session.
Screen coordinates only: scaling for models happens in the backend.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

import Xlib.XK as XK
from Xlib import X, Xatom
from Xlib import error as xerror
from Xlib.ext import xtest

from backends.vm.keys import MODIFIER_KEYSYMS, Keymap, char_to_keysym
from backends.vm.xconnect import XEndpoint, open_display
from session.errors import BackendError

log = logging.getLogger(__name__)

BUTTONS = {"left": 1, "middle": 2, "right": 3}
SCROLL_BUTTONS = {"up": 4, "down": 5, "left": 6, "right": 7}
SHIFT = XK.XK_Shift_L
#: Sync with the server every this many typed characters, so a long text never floods it.
TYPE_CHUNK = 64
#: Button1Mask..Button5Mask in a pointer query.
BUTTONS_DOWN = 0x1F00
#: How long a pointer action waits for the server to process it (see `_settle`).
SETTLE_TIMEOUT = 2.0


class XInput:
    """XTEST input and a few window queries on a private connection to one display."""

    def __init__(self, endpoint: XEndpoint) -> None:
        self.display = open_display(endpoint)
        self._errors: list[xerror.XError] = []
        self.display.set_error_handler(self._on_error)
        if not self.display.has_extension("XTEST"):
            self.display.close()
            raise BackendError(f"X server {endpoint.display} lacks the XTEST extension needed for input")
        self.root = self.display.screen().root
        self.keymap = Keymap(self.display)
        self._atoms: dict[str, int] = {}

    def close(self) -> None:
        try:
            self.display.close()
        except Exception:  # the server may already be gone
            log.debug("closing X input connection", exc_info=True)

    # -- pointer -----------------------------------------------------------------------

    def pointer(self) -> tuple[int, int]:
        reply = self.root.query_pointer()
        return reply.root_x, reply.root_y

    def move(self, x: int, y: int) -> None:
        xtest.fake_input(self.display, X.MotionNotify, x=x, y=y)
        self._sync()

    def click(self, x: int, y: int, button: int, clicks: int, hold: Sequence[int] = ()) -> None:
        xtest.fake_input(self.display, X.MotionNotify, x=x, y=y)
        held = self._press_keys(hold)
        for _ in range(clicks):
            xtest.fake_input(self.display, X.ButtonPress, button)
            xtest.fake_input(self.display, X.ButtonRelease, button)
        self._release_keys(held)
        self._settle()

    def scroll(self, x: int, y: int, button: int, amount: int, hold: Sequence[int] = ()) -> None:
        self.click(x, y, button, amount, hold)

    def drag(self, path: Sequence[tuple[int, int]], button: int, step_delay: float) -> None:
        """Press at the first point, move through the rest, release at the last."""
        first, rest = path[0], path[1:]
        xtest.fake_input(self.display, X.MotionNotify, x=first[0], y=first[1])
        xtest.fake_input(self.display, X.ButtonPress, button)
        self._sync()
        for x, y in rest:
            time.sleep(step_delay)
            xtest.fake_input(self.display, X.MotionNotify, x=x, y=y)
            self._sync()
        time.sleep(step_delay)
        xtest.fake_input(self.display, X.ButtonRelease, button)
        self._settle()

    # -- keyboard ----------------------------------------------------------------------

    def type_text(self, text: str) -> None:
        for start in range(0, len(text), TYPE_CHUNK):
            for char in text[start : start + TYPE_CHUNK]:
                self._tap(char_to_keysym(char))
            self._sync()

    def press_combo(self, keysyms: Sequence[int], repeat: int = 1) -> None:
        """Hold every key but the last (in order), tap the last `repeat` times, release in reverse."""
        *holds, last = keysyms
        held = self._press_keys(holds)
        stroke = self.keymap.stroke(last)
        # Add Shift if the key needs it (ctrl+'+') and it isn't already down; never for a modifier.
        shift = stroke.shift and last not in MODIFIER_KEYSYMS and SHIFT not in holds
        shift_code = self.keymap.stroke(SHIFT).keycode if shift else 0
        for _ in range(repeat):
            self._stroke(stroke.keycode, shift_code)
        self._release_keys(held)
        self._sync()

    def _tap(self, keysym: int) -> None:
        stroke = self.keymap.stroke(keysym)
        self._stroke(stroke.keycode, self.keymap.stroke(SHIFT).keycode if stroke.shift else 0)

    def _stroke(self, keycode: int, shift_code: int) -> None:
        """Press and release one key, inside Shift when `shift_code` is non-zero."""
        if shift_code:
            xtest.fake_input(self.display, X.KeyPress, shift_code)
        xtest.fake_input(self.display, X.KeyPress, keycode)
        xtest.fake_input(self.display, X.KeyRelease, keycode)
        if shift_code:
            xtest.fake_input(self.display, X.KeyRelease, shift_code)

    def _press_keys(self, keysyms: Iterable[int]) -> list[int]:
        codes = []
        for keysym in keysyms:
            code = self.keymap.stroke(keysym).keycode
            xtest.fake_input(self.display, X.KeyPress, code)
            codes.append(code)
        return codes

    def _release_keys(self, codes: Sequence[int]) -> None:
        for code in reversed(codes):
            xtest.fake_input(self.display, X.KeyRelease, code)

    # -- window queries ----------------------------------------------------------------

    def active_window_title(self) -> str | None:
        """Title of the focused top-level window (per the window manager), or None."""
        active = self._window_property(self.root, "_NET_ACTIVE_WINDOW", Xatom.WINDOW)
        return self.window_title(active[0]) if active and active[0] else None

    def window_title(self, window_id: int) -> str | None:
        """A window's title (`_NET_WM_NAME`, else `WM_NAME`), or None if it has none or is gone."""
        window = self.display.create_resource_object("window", window_id)
        try:
            name = window.get_full_property(self._atom("_NET_WM_NAME"), self._atom("UTF8_STRING"))
            if name is not None and name.value:
                value = name.value
                return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            legacy = window.get_wm_name()
        except xerror.XError:
            return None  # the window closed between two requests
        if isinstance(legacy, bytes):
            legacy = legacy.decode("latin-1")
        return legacy or None

    def window_ready(self, window_id: int) -> bool:
        """True once a window is viewable and, with a window manager, focused."""
        window = self.display.create_resource_object("window", window_id)
        try:
            if window.get_attributes().map_state != X.IsViewable:
                return False
        except xerror.XError:
            return True  # gone already: nothing to wait for
        if self._window_property(self.root, "_NET_SUPPORTING_WM_CHECK", Xatom.WINDOW) is None:
            return True  # no window manager: input goes to the window under the pointer
        # The property is absent until the window manager first focuses something.
        active = self._window_property(self.root, "_NET_ACTIVE_WINDOW", Xatom.WINDOW)
        return active is not None and len(active) > 0 and active[0] == window_id

    def client_windows(self) -> list[int]:
        """Top-level windows the window manager manages (`_NET_CLIENT_LIST`), else mapped root children."""
        managed = self._window_property(self.root, "_NET_CLIENT_LIST", Xatom.WINDOW)
        if managed is not None:
            return list(managed)
        out = []
        for child in self.root.query_tree().children:
            try:
                if child.get_attributes().map_state == X.IsViewable:
                    out.append(child.id)
            except xerror.XError:
                continue
        return out

    def _window_property(self, window: object, name: str, kind: int) -> list[int] | None:
        prop = window.get_full_property(self._atom(name), kind)  # type: ignore[attr-defined]
        if prop is None:
            return None
        return [int(v) for v in prop.value]

    def _atom(self, name: str) -> int:
        if name not in self._atoms:
            self._atoms[name] = self.display.intern_atom(name)
        return self._atoms[name]

    # -- errors ------------------------------------------------------------------------

    def _on_error(self, err: xerror.XError, request: object = None) -> None:
        self._errors.append(err)

    def _settle(self) -> None:
        """Wait until the server has processed our button events.

        A window manager's click-to-focus grab freezes the pointer until the WM replays
        the click; events sent meanwhile queue up and, on a busy machine, the next action
        could land before the last one. While frozen, the query still shows the button down.
        """
        self._sync()
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while self.root.query_pointer().mask & BUTTONS_DOWN:
            if time.monotonic() > deadline:
                log.warning("pointer still frozen after %.1f s (window manager busy?)", SETTLE_TIMEOUT)
                return
            time.sleep(0.002)

    def _sync(self) -> None:
        """Round-trip to the server; raise the first asynchronous X error since the last sync."""
        self.display.sync()
        if self._errors:
            err, self._errors = self._errors[0], []
            raise BackendError(f"X server rejected an input request: {err}")
