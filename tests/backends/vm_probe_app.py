"""A tiny X program for the vm tests: one window that records what reaches it.

Usage: python vm_probe_app.py LOG_PATH [TITLE]   (LOG_PATH '-' is standard output)

Writes JSON lines to LOG_PATH: `{"event": "geometry", "x", "y", "width", "height"}`
(window position on the screen) whenever it is exposed or moved, `{"event": "button",
"button", "x", "y", "root_x", "root_y"}` per button press, `{"event": "key", "keysym",
"state"}` per key press. Exits when the X server goes away.
"""

from __future__ import annotations

import json
import sys

import Xlib.XK as XK
from Xlib import X
from Xlib import display as xdisplay
from Xlib import error as xerror


def main(log_path: str, title: str = "vm-probe") -> None:
    display = xdisplay.Display()
    screen = display.screen()
    window = screen.root.create_window(
        0,
        0,
        320,
        240,
        0,
        screen.root_depth,
        background_pixel=0x3366CC,
        event_mask=X.ExposureMask | X.ButtonPressMask | X.KeyPressMask | X.StructureNotifyMask,
    )
    window.set_wm_name(title)
    window.map()
    display.flush()
    with open(1 if log_path == "-" else log_path, "a", buffering=1) as log:

        def write(**record: object) -> None:
            log.write(json.dumps(record) + "\n")

        while True:
            try:
                event = display.next_event()
            except (xerror.ConnectionClosedError, OSError):
                return
            if event.type in (X.Expose, X.ConfigureNotify, X.MapNotify):
                pos = screen.root.translate_coords(window, 0, 0)
                geom = window.get_geometry()
                write(event="geometry", x=pos.x, y=pos.y, width=geom.width, height=geom.height)
            elif event.type == X.ButtonPress:
                write(
                    event="button",
                    button=event.detail,
                    x=event.event_x,
                    y=event.event_y,
                    root_x=event.root_x,
                    root_y=event.root_y,
                    state=event.state,
                )
            elif event.type == X.KeyPress:
                keysym = display.keycode_to_keysym(event.detail, 0)
                write(event="key", keysym=XK.keysym_to_string(keysym) or hex(keysym), state=event.state)


if __name__ == "__main__":
    main(*sys.argv[1:])
