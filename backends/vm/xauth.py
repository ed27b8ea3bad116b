"""X authorization cookies: a desktop answers only to clients holding its cookie.

Each desktop gets a random MIT-MAGIC-COOKIE-1. Xvfb reads it from the desktop's own
authority file (`-auth`), which is also the `XAUTHORITY` of the apps launched on that
desktop. The server keeps the cookie in memory and hands it to its own connections
directly (`backends.vm.xconnect`), so no authority file or environment variable of the
server process is involved.

Entries use the wildcard family (any host name: a sandbox has its own) and an empty
display number (any display), so the one file fits wherever the desktop's clients run.
"""

from __future__ import annotations

import os
import socket
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


def encode_entry(number: str, cookie: bytes, *, family: int = FAMILY_WILD) -> bytes:
    host = socket.gethostname().encode() if family == FAMILY_LOCAL else b""
    return struct.pack(">H", family) + b"".join(_field(part) for part in (host, number.encode(), COOKIE_NAME, cookie))


def write_authority(path: Path, entries: dict[str, bytes], mode: int = 0o600) -> None:
    """Write `display number -> cookie` entries atomically (readers never see half a file)."""
    data = b"".join(encode_entry(number, cookie) for number, cookie in entries.items())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
