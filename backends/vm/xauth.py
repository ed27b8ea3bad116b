"""X authorization cookies: a desktop answers only to clients holding its cookie.

Each desktop gets a random MIT-MAGIC-COOKIE-1. Xvfb reads it from the desktop's own
authority file (`-auth`), which is also the `XAUTHORITY` of the apps launched on that
desktop. The server process itself talks to every desktop, so it keeps one authority
file of its own with an entry per live display, and points its `XAUTHORITY` at it
(python-xlib and libX11, used by mss, both read it on each connection).

Entries use the local family with this host's name, the form both python-xlib and
libXau match; an empty display number matches any display.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import threading
from pathlib import Path

from backends.processes import make_scratch_dir

COOKIE_NAME = b"MIT-MAGIC-COOKIE-1"
FAMILY_LOCAL = 256


def new_cookie() -> bytes:
    return os.urandom(16)


def _field(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def encode_entry(number: str, cookie: bytes) -> bytes:
    host = socket.gethostname().encode()
    return struct.pack(">H", FAMILY_LOCAL) + b"".join(
        _field(part) for part in (host, number.encode(), COOKIE_NAME, cookie)
    )


def write_authority(path: Path, entries: dict[str, bytes], inherited: bytes = b"") -> None:
    """Write `display number -> cookie` entries atomically (readers never see half a file).

    `inherited` (another authority file's bytes) goes first, unchanged.
    """
    data = inherited + b"".join(encode_entry(number, cookie) for number, cookie in entries.items())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class ServerAuthority:
    """This process's authority file: one entry per live desktop.

    While any desktop lives, `XAUTHORITY` points here; the file starts with the entries of
    the authority file the process had before (so an embedding program keeps reaching its
    own displays), and with the last desktop gone the previous `XAUTHORITY` comes back.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, bytes] = {}
        self._path: Path | None = None
        self._inherited = b""
        self._previous: str | None = None

    def add(self, number: int, cookie: bytes) -> None:
        with self._lock:
            if self._path is None:
                self._previous = os.environ.get("XAUTHORITY")
                self._inherited = _read_existing(self._previous)
                self._path = make_scratch_dir("agentflow-xauth-") / "Xauthority"
                write_authority(self._path, {}, self._inherited)
                # Before the first connection to this display: libX11 and python-xlib read it then.
                os.environ["XAUTHORITY"] = str(self._path)
            self._entries[str(number)] = cookie
            write_authority(self._path, self._entries, self._inherited)

    def remove(self, number: int) -> None:
        """Forget a display; with none left, the file goes and the old `XAUTHORITY` returns."""
        with self._lock:
            if self._path is None or self._entries.pop(str(number), None) is None:
                return
            if self._entries:
                write_authority(self._path, self._entries, self._inherited)
                return
            if self._previous is None:
                os.environ.pop("XAUTHORITY", None)
            else:
                os.environ["XAUTHORITY"] = self._previous
            shutil.rmtree(self._path.parent, ignore_errors=True)
            self._path = None


def _read_existing(configured: str | None) -> bytes:
    candidate = Path(configured) if configured else Path.home() / ".Xauthority"
    try:
        return candidate.read_bytes()
    except OSError:
        return b""


SERVER_AUTHORITY = ServerAuthority()
