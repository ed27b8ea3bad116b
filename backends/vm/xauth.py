"""X authorization cookies: a desktop answers only to clients holding its cookie.

Each desktop gets a random MIT-MAGIC-COOKIE-1. Xvfb reads it from the desktop's own
authority file (`-auth`), which is also the `XAUTHORITY` of the apps launched on that
desktop. The server keeps the cookie in memory and hands it to its own connections
directly (`backends.vm.xconnect`), so no authority file or environment variable of the
server process is involved.

Entries have an empty display number (any display) and come twice: with the wildcard
family, which libXau clients (xterm, openbox, Chromium) match on any host name, and with
the local family and the host name the desktop's clients see (a sandbox has its own),
the only form python-xlib matches.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

COOKIE_NAME = b"MIT-MAGIC-COOKIE-1"
FAMILY_LOCAL = 256
FAMILY_WILD = 65535


def new_cookie() -> bytes:
    return os.urandom(16)


def _field(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def encode_entry(family: int, host: str, number: str, cookie: bytes) -> bytes:
    return struct.pack(">H", family) + b"".join(
        _field(part) for part in (host.encode(), number.encode(), COOKIE_NAME, cookie)
    )


def desktop_entries(cookie: bytes, hostname: str) -> bytes:
    """The authority file of one desktop whose clients see `hostname`."""
    return encode_entry(FAMILY_WILD, "", "", cookie) + encode_entry(FAMILY_LOCAL, hostname, "", cookie)


def write_authority(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write an authority file atomically (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
