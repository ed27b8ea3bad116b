"""Key names and characters to X keysyms, and keysyms to keycodes on one display.

Two jobs, kept apart:

- `parse_key` / `parse_combo` turn what an agent writes (`"ctrl"`, `"Return"`,
  `"ctrl+shift+t"`, `"F5"`, `"é"`) into keysyms, or raise `ParameterError` naming
  close matches.
- `Keymap` finds the keycode (and whether Shift is needed) for a keysym on a live
  display. A keysym the keyboard lacks (most non-ASCII text) is bound to a spare
  keycode with `ChangeKeyboardMapping`, the way xdotool does it. Bindings stay in
  place and are reused least-recently-used first: a client translates a keycode
  when it reads the event, so rebinding a keycode right after pressing it could make
  the client see the new character.
"""

from __future__ import annotations

import difflib
import time
from collections import OrderedDict
from dataclasses import dataclass

import Xlib.XK as XK
from Xlib import display as xdisplay

from session.errors import ParameterError

XK.load_keysym_group("xf86")

#: Friendly names an agent is likely to use, lower-case, mapped to X keysym names.
ALIASES: dict[str, str] = {
    "ctrl": "Control_L",
    "control": "Control_L",
    "lctrl": "Control_L",
    "rctrl": "Control_R",
    "alt": "Alt_L",
    "lalt": "Alt_L",
    "ralt": "Alt_R",
    "altgr": "ISO_Level3_Shift",
    "option": "Alt_L",
    "shift": "Shift_L",
    "lshift": "Shift_L",
    "rshift": "Shift_R",
    "super": "Super_L",
    "win": "Super_L",
    "windows": "Super_L",
    "meta": "Super_L",
    "cmd": "Super_L",
    "command": "Super_L",
    "enter": "Return",
    "return": "Return",
    "ret": "Return",
    "esc": "Escape",
    "escape": "Escape",
    "tab": "Tab",
    "backspace": "BackSpace",
    "bksp": "BackSpace",
    "delete": "Delete",
    "del": "Delete",
    "insert": "Insert",
    "ins": "Insert",
    "space": "space",
    "spacebar": "space",
    "up": "Up",
    "down": "Down",
    "left": "Left",
    "right": "Right",
    "arrowup": "Up",
    "arrowdown": "Down",
    "arrowleft": "Left",
    "arrowright": "Right",
    "home": "Home",
    "end": "End",
    "pageup": "Prior",
    "page_up": "Prior",
    "pgup": "Prior",
    "pagedown": "Next",
    "page_down": "Next",
    "pgdn": "Next",
    "capslock": "Caps_Lock",
    "caps_lock": "Caps_Lock",
    "numlock": "Num_Lock",
    "scrolllock": "Scroll_Lock",
    "printscreen": "Print",
    "print": "Print",
    "prtsc": "Print",
    "pause": "Pause",
    "break": "Break",
    "menu": "Menu",
    "apps": "Menu",
    "plus": "plus",
    "minus": "minus",
    "comma": "comma",
    "period": "period",
    "slash": "slash",
    "backslash": "backslash",
    "volumeup": "XF86_AudioRaiseVolume",
    "volumedown": "XF86_AudioLowerVolume",
    "mute": "XF86_AudioMute",
}
ALIASES.update({f"f{n}": f"F{n}" for n in range(1, 25)})

#: Keysyms with this bit are vendor-specific (XF86 media keys and the like).
VENDOR_KEYSYM_BIT = 0x10000000

#: Control characters `type` accepts, as the key that produces them.
TEXT_CONTROL: dict[str, int] = {"\n": XK.XK_Return, "\r": XK.XK_Return, "\t": XK.XK_Tab, "\b": XK.XK_BackSpace}

MODIFIER_KEYSYMS = frozenset(
    XK.string_to_keysym(n)
    for n in (
        "Control_L",
        "Control_R",
        "Alt_L",
        "Alt_R",
        "Shift_L",
        "Shift_R",
        "Super_L",
        "Super_R",
        "Meta_L",
        "Meta_R",
        "ISO_Level3_Shift",
    )
)


def char_to_keysym(char: str) -> int:
    """The keysym that produces `char` (Latin-1 keysyms are the code point, others 0x1000000+cp)."""
    if char in TEXT_CONTROL:
        return TEXT_CONTROL[char]
    cp = ord(char)
    if cp < 0x20 or cp == 0x7F:
        raise ParameterError(
            f"cannot type control character U+{cp:04X}; use the key tool for special keys (e.g. 'Escape')"
        )
    if 0x20 <= cp <= 0x7E or 0xA0 <= cp <= 0xFF:
        return cp
    return 0x1000000 + cp


def _keysym_index() -> dict[str, int]:
    """Every keysym name python-xlib knows, lower-cased (`kp_enter`, `xf86audiomute`)."""
    index: dict[str, int] = {}
    for attr, value in vars(XK).items():
        if attr.startswith("XK_") and isinstance(value, int):
            name = attr[3:].lower()
            index.setdefault(name, value)
            if name.startswith("xf86_"):
                index.setdefault("xf86" + name[5:], value)
    return index


_KEYSYMS_LOWER = _keysym_index()


def _keysym_by_name(name: str) -> int:
    keysym = XK.string_to_keysym(name)
    return keysym or _KEYSYMS_LOWER.get(name.lower(), 0)


def parse_key(name: str, *, in_combo: bool = False) -> int:
    """One key name (`"ctrl"`, `"Return"`, `"F5"`, `"a"`, `"é"`, `"XF86AudioMute"`) to a keysym.

    Raises:
        ParameterError: the name is empty or names no key.
    """
    stripped = name.strip() if name.strip() else name
    if not stripped:
        raise ParameterError("empty key name: give a key such as 'Return', 'ctrl', 'a' or 'F5'")
    if len(stripped) == 1:
        # In a combination, 'ctrl+L' means ctrl+l; Shift must be asked for explicitly.
        return char_to_keysym(stripped.lower() if in_combo else stripped)
    alias = ALIASES.get(stripped.lower().replace(" ", "").replace("-", ""))
    keysym = _keysym_by_name(alias or stripped)
    if keysym:
        return keysym
    choices = sorted(set(ALIASES) | {v for v in ALIASES.values() if not v.startswith("XF86")})
    near = difflib.get_close_matches(stripped.lower(), choices, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    raise ParameterError(
        f"unknown key name {name!r}.{hint} Use names like 'enter', 'esc', 'tab', 'backspace', "
        "'ctrl', 'alt', 'shift', 'super', 'up', 'pagedown', 'f5', a single character, "
        "or an X keysym name such as 'KP_Enter'."
    )


def split_combo(keys: str | list[str]) -> list[str]:
    """`"ctrl+shift+t"` or `["ctrl", "shift", "t"]` to key names; `"ctrl++"` ends with the plus key."""
    if not isinstance(keys, str):
        return list(keys)
    text = keys.strip()
    if text == "+":
        return ["+"]
    if text.endswith("++"):
        return [*text[:-2].split("+"), "+"]
    return text.split("+")


def parse_combo(keys: str | list[str]) -> list[int]:
    """A combination (`["ctrl", "shift", "t"]` or `"ctrl+shift+t"`) to keysyms, modifiers first as given.

    Raises:
        ParameterError: the combination is empty or a name is unknown.
    """
    names = split_combo(keys)
    if not names or all(not n.strip() for n in names):
        raise ParameterError("no keys given: pass e.g. ['ctrl', 'c'] or 'ctrl+c'")
    return [parse_key(n, in_combo=len(names) > 1) for n in names]


@dataclass(frozen=True, slots=True)
class KeyStroke:
    """How to produce one keysym: its keycode, and whether Shift must be held."""

    keycode: int
    shift: bool


class Keymap:
    """Keysym -> keycode lookup for one X connection, binding spare keycodes on demand.

    Spare keycodes are the unbound ones plus those carrying vendor keysyms (XF86 media
    and launch keys, which nothing types): about 110 on Xvfb's default keyboard. Not
    thread-safe; the backend calls it from one thread at a time.
    """

    #: A spare keycode rebound sooner than this after its last press could be read by
    #: the client with its new meaning (clients fetch a changed keymap lazily).
    REBIND_GUARD = 0.5

    def __init__(self, display: xdisplay.Display) -> None:
        self.display = display
        self.min_keycode: int = display.display.info.min_keycode
        self.max_keycode: int = display.display.info.max_keycode
        self._known: dict[int, KeyStroke] = {}
        self._spare: OrderedDict[int, tuple[int, ...]] = OrderedDict()  # keycode -> keysyms on it
        self._last_used: dict[int, float] = {}
        self.width = 2
        self.refresh()

    def refresh(self) -> None:
        count = self.max_keycode - self.min_keycode + 1
        rows = self.display.get_keyboard_mapping(self.min_keycode, count)
        self.width = max(2, len(rows[0]) if rows else 2)
        self._known.clear()
        self._spare.clear()
        borrowed: list[tuple[int, tuple[int, ...]]] = []
        for offset, row in enumerate(rows):
            keycode = self.min_keycode + offset
            if keycode <= 8:
                continue  # some toolkits ignore keycode 8
            if not any(row):
                self._spare[keycode] = ()
                continue
            if row[0] & VENDOR_KEYSYM_BIT:
                borrowed.append((keycode, tuple(k for k in row if k)))
            for index, shift in ((0, False), (1, True)):
                keysym = row[index] if index < len(row) else 0
                if keysym and keysym not in self._known:
                    self._known[keysym] = KeyStroke(keycode, shift)
        # Unbound keycodes are used first, then the borrowed ones.
        self._spare.update(borrowed)
        # Letters listed only in lower case still type upper case with Shift.
        for keysym, stroke in list(self._known.items()):
            if 0x61 <= keysym <= 0x7A and not stroke.shift:
                self._known.setdefault(keysym - 0x20, KeyStroke(stroke.keycode, True))

    def stroke(self, keysym: int) -> KeyStroke:
        """The keycode for `keysym`, binding a spare keycode if the keyboard has none.

        Raises:
            ParameterError: no spare keycode exists on this display.
        """
        known = self._known.get(keysym)
        if known is None:
            known = self._bind_spare(keysym)
        if known.keycode in self._spare:
            self._spare.move_to_end(known.keycode)
            self._last_used[known.keycode] = time.monotonic()
        return known

    def _bind_spare(self, keysym: int) -> KeyStroke:
        if not self._spare:
            raise ParameterError(
                f"the keyboard has no key for {XK.keysym_to_string(keysym) or hex(keysym)} "
                "and no spare keycode to map it to"
            )
        keycode, old = next(iter(self._spare.items()))
        since = time.monotonic() - self._last_used.get(keycode, 0.0)
        if since < self.REBIND_GUARD:
            # Every spare keycode was just used: let clients read those events first.
            self.display.sync()
            time.sleep(self.REBIND_GUARD - since)
        for previous in old:
            if self._known.get(previous, KeyStroke(0, False)).keycode == keycode:
                del self._known[previous]
        row = [keysym, keysym] + [0] * (self.width - 2)
        self.display.change_keyboard_mapping(keycode, [row])
        self.display.sync()
        stroke = KeyStroke(keycode, False)
        self._spare[keycode] = (keysym,)
        self._known[keysym] = stroke
        return stroke
