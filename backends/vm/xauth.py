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

from backends.processes import OWNER_FILE, make_scratch_dir

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


def write_authority(path: Path, entries: dict[str, bytes]) -> None:
    """Write `display number -> cookie` entries atomically (readers never see half a file)."""
    data = b"".join(encode_entry(number, cookie) for number, cookie in entries.items())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class ServerAuthority:
    """This process's authority file: one entry per live desktop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, bytes] = {}
        self._path: Path | None = None

    def add(self, number: int, cookie: bytes) -> None:
        with self._lock:
            if self._path is None:
                self._path = make_scratch_dir("agentflow-xauth-") / "Xauthority"
                # Set once, before the first connection to any of our displays; the path
                # stays the same for the process's life (the directory comes and goes).
                os.environ["XAUTHORITY"] = str(self._path)
            if not self._path.parent.exists():  # deleted when its last display went
                self._path.parent.mkdir(mode=0o700)
                (self._path.parent / OWNER_FILE).write_text(str(os.getpid()))
            self._entries[str(number)] = cookie
            write_authority(self._path, self._entries)

    def remove(self, number: int) -> None:
        """Forget a display; with none left, the file and its directory are deleted."""
        with self._lock:
            if self._path is None or self._entries.pop(str(number), None) is None:
                return
            if self._entries:
                write_authority(self._path, self._entries)
            else:
                shutil.rmtree(self._path.parent, ignore_errors=True)


SERVER_AUTHORITY = ServerAuthority()
