"""A minimal X connection that does one thing: grab the root window's pixels, fast.

python-xlib reassembles a large reply by concatenating bytes chunk after chunk, which
costs ~25 ms for a 1920x1080 screen (8 MB), more than grabbing and encoding together.
This client speaks just enough of the protocol: connection setup with the desktop's
cookie, then MIT-SHM `ShmGetImage` into a memfd it hands the X server over the socket
(`ShmAttachFd`: fd passing works across the sandbox's IPC namespace, where SysV shared
memory would not), else core `GetImage` read straight into one buffer. It connects by
socket path like `xconnect`, so it works for sandboxed desktops too. It selects no
events, so the only thing the server ever sends is our replies (or errors).
"""

from __future__ import annotations

import array
import contextlib
import logging
import mmap
import os
import socket
import struct

from backends.vm.xauth import COOKIE_NAME
from backends.vm.xconnect import XEndpoint

log = logging.getLogger(__name__)

_GET_IMAGE = 73
_GET_INPUT_FOCUS = 43
_QUERY_EXTENSION = 98
_SHM_QUERY_VERSION = 0
_SHM_GET_IMAGE = 4
_SHM_ATTACH_FD = 6
_Z_PIXMAP = 2
_ALL_PLANES = 0xFFFFFFFF


class GrabError(ConnectionError):
    """The X server refused the connection or a request, or went away."""


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


class RootGrabber:
    """One connection to one desktop for screenshots (blocking; use from one thread at a time)."""

    def __init__(self, endpoint: XEndpoint, *, shared_memory: bool = True) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._shm: _SharedImage | None = None
        self._shm_opcode: int | None = None
        try:
            self._sock.connect(str(endpoint.socket_path))
            self.root, self.depth, self._next_id = self._setup(endpoint)
            self._shm_opcode = self._shm_extension() if shared_memory else None
        except OSError as exc:
            self._sock.close()
            raise GrabError(f"cannot reach the X server of display {endpoint.display}: {exc}") from None
        except GrabError:
            self._sock.close()
            raise

    @property
    def shared_memory(self) -> bool:
        """True while grabs go through MIT-SHM."""
        return self._shm_opcode is not None

    def _setup(self, endpoint: XEndpoint) -> tuple[int, int, int]:
        cookie = endpoint.cookie
        request = struct.pack("<BxHHHHxx", 0x6C, 11, 0, len(COOKIE_NAME), len(cookie))
        self._sock.sendall(request + _pad(COOKIE_NAME) + _pad(cookie))
        status, reason_len, _major, _minor, extra_words = struct.unpack("<BBHHH", self._read(8))
        extra = self._read(extra_words * 4)
        if status != 1:
            reason = extra[:reason_len].decode("latin-1", "replace").strip()
            raise GrabError(f"the X server of display {endpoint.display} refused the connection: {reason}")
        id_base, id_mask = struct.unpack_from("<II", extra, 4)
        vendor_len, _max_request, _screens, formats = struct.unpack_from("<HHBB", extra, 16)
        screen = 32 + len(_pad(b"\0" * vendor_len)) + 8 * formats
        root = struct.unpack_from("<I", extra, screen)[0]
        depth = extra[screen + 38]
        return root, depth, id_base | (id_mask & -id_mask)

    def _shm_extension(self) -> int | None:
        """MIT-SHM's major opcode if the server has it with fd passing (version 1.2+), else None."""
        name = b"MIT-SHM"
        self._sock.sendall(struct.pack("<BxHHxx", _QUERY_EXTENSION, 2 + len(_pad(name)) // 4, len(name)) + _pad(name))
        reply = self._reply()
        if not reply[8]:
            return None
        opcode = reply[9]
        self._sock.sendall(struct.pack("<BBH", opcode, _SHM_QUERY_VERSION, 1))
        major, minor = struct.unpack_from("<HH", self._reply(), 8)
        return opcode if (major, minor) >= (1, 2) else None

    def grab(self, width: int, height: int) -> memoryview | bytearray:
        """The root window's pixels, `width` x `height` from (0, 0), 32 bits per pixel (BGRX).

        A memoryview of shared memory is valid until the next `grab`: copy what you keep.
        """
        try:
            if self._shm_opcode is not None:
                try:
                    return self._grab_shared(width, height)
                except GrabError as exc:
                    log.info("MIT-SHM screenshots unavailable (%s); using GetImage", exc)
                    self._shm_opcode = None
                    self._drop_shared()
            return self._grab_copy(width, height)
        except GrabError:
            raise
        except OSError as exc:
            raise GrabError(f"lost the screenshot connection: {exc}") from None

    def _grab_copy(self, width: int, height: int) -> bytearray:
        request = struct.pack("<BBHIhhHHI", _GET_IMAGE, _Z_PIXMAP, 5, self.root, 0, 0, width, height, _ALL_PLANES)
        self._sock.sendall(request)
        header = self._reply_header()
        (words,) = struct.unpack_from("<I", header, 4)
        data = bytearray(words * 4)
        self._read_into(memoryview(data))
        return data

    def _grab_shared(self, width: int, height: int) -> memoryview:
        assert self._shm_opcode is not None
        size = width * height * 4
        if self._shm is None or self._shm.size != size:
            self._drop_shared()
            self._shm = self._attach(size)
        request = struct.pack(
            "<BBHIhhHHIBxxxII",
            self._shm_opcode,
            _SHM_GET_IMAGE,
            8,
            self.root,
            0,
            0,
            width,
            height,
            _ALL_PLANES,
            _Z_PIXMAP,
            self._shm.segment,
            0,
        )
        self._sock.sendall(request)
        self._reply()
        return self._shm.view

    def _attach(self, size: int) -> _SharedImage:
        assert self._shm_opcode is not None
        fd = os.memfd_create("agentflow-screenshot", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            buffer = mmap.mmap(fd, size, prot=mmap.PROT_READ)
            segment = self._next_id
            self._next_id += 1
            request = struct.pack("<BBHIBxxx", self._shm_opcode, _SHM_ATTACH_FD, 3, segment, 0)
            self._sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        finally:
            os.close(fd)  # the server holds its own copy
        # AttachFd has no reply: a round trip surfaces its error, if any, before the first grab.
        self._sock.sendall(struct.pack("<BxH", _GET_INPUT_FOCUS, 1))
        try:
            self._reply()
        except GrabError:
            buffer.close()
            self._reply()  # the round trip's own reply still follows the error: keep in step
            raise
        return _SharedImage(segment, size, buffer)

    def _drop_shared(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None

    def _reply(self) -> bytes:
        """A reply with no extra data (or only what fits in 32 bytes)."""
        header = self._reply_header()
        (words,) = struct.unpack_from("<I", header, 4)
        if words:
            self._read(words * 4)
        return header

    def _reply_header(self) -> bytes:
        header = self._read(32)
        if header[0] == 0:
            raise GrabError(f"the X server refused a request (error code {header[1]}, opcode {header[10]})")
        return header

    def close(self) -> None:
        self._drop_shared()
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


class _SharedImage:
    """A memfd-backed buffer the X server writes screenshots into (segment `segment`)."""

    def __init__(self, segment: int, size: int, buffer: mmap.mmap) -> None:
        self.segment = segment
        self.size = size
        self._buffer = buffer
        self.view = memoryview(buffer)

    def close(self) -> None:
        self.view.release()
        self._buffer.close()
