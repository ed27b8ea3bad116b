"""A minimal X connection that does one thing: GetImage of the root window, fast.

python-xlib reassembles a large reply by concatenating bytes chunk after chunk, which
costs ~25 ms for a 1920x1080 screen (8 MB), more than grabbing and encoding together.
This client speaks just enough of the core protocol (connection setup with the
desktop's cookie, then `GetImage`) and reads each reply straight into one buffer. It
connects by socket path like `xconnect`, so it works for sandboxed desktops too. It
selects no events, so the only thing the server ever sends is our replies (or errors).
"""

from __future__ import annotations

import contextlib
import socket
import struct

from backends.vm.xauth import COOKIE_NAME
from backends.vm.xconnect import XEndpoint

_GET_IMAGE = 73
_Z_PIXMAP = 2
_ALL_PLANES = 0xFFFFFFFF


class GrabError(ConnectionError):
    """The X server refused the connection or a request, or went away."""


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


class RootGrabber:
    """One connection to one desktop for screenshots (blocking; use from one thread at a time)."""

    def __init__(self, endpoint: XEndpoint) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(str(endpoint.socket_path))
            self.root, self.depth = self._setup(endpoint)
        except OSError as exc:
            self._sock.close()
            raise GrabError(f"cannot reach the X server of display {endpoint.display}: {exc}") from None
        except GrabError:
            self._sock.close()
            raise

    def _setup(self, endpoint: XEndpoint) -> tuple[int, int]:
        cookie = endpoint.cookie
        request = struct.pack("<BxHHHHxx", 0x6C, 11, 0, len(COOKIE_NAME), len(cookie))
        self._sock.sendall(request + _pad(COOKIE_NAME) + _pad(cookie))
        status, reason_len, _major, _minor, extra_words = struct.unpack("<BBHHH", self._read(8))
        extra = self._read(extra_words * 4)
        if status != 1:
            reason = extra[:reason_len].decode("latin-1", "replace").strip()
            raise GrabError(f"the X server of display {endpoint.display} refused the connection: {reason}")
        vendor_len, _max_request, _screens, formats = struct.unpack_from("<HHBB", extra, 16)
        screen = 32 + len(_pad(b"\0" * vendor_len)) + 8 * formats
        root = struct.unpack_from("<I", extra, screen)[0]
        depth = extra[screen + 38]
        return root, depth

    def grab(self, width: int, height: int) -> bytearray:
        """The root window's pixels, `width` x `height` from (0, 0), 32 bits per pixel (BGRX)."""
        request = struct.pack("<BBHIhhHHI", _GET_IMAGE, _Z_PIXMAP, 5, self.root, 0, 0, width, height, _ALL_PLANES)
        try:
            self._sock.sendall(request)
            header = self._read(32)
            if header[0] == 0:
                raise GrabError(f"the X server refused GetImage (error code {header[1]})")
            (words,) = struct.unpack_from("<I", header, 4)
            data = bytearray(words * 4)
            self._read_into(memoryview(data))
        except OSError as exc:
            raise GrabError(f"lost the screenshot connection: {exc}") from None
        return data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def _read(self, size: int) -> bytes:
        buffer = bytearray(size)
        self._read_into(memoryview(buffer))
        return bytes(buffer)

    def _read_into(self, view: memoryview) -> None:
        while view:
            received = self._sock.recv_into(view)
            if not received:
                raise GrabError("the X server closed the connection")
            view = view[received:]
