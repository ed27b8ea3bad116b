"""Connect python-xlib to one desktop by its socket path and cookie, without touching the environment.

A sandboxed desktop's X socket is a file in that session's own directory (bound into its
sandbox at /tmp/.X11-unix), not in the host's /tmp/.X11-unix, and its cookie belongs to
the backend instance, not to `XAUTHORITY`. python-xlib can only find sockets under
/tmp/.X11-unix and cookies in the authority file named by the environment, so this
module hooks its two connection steps (`get_socket`, `get_auth`). The hooks act only
on the thread that is inside `open_display`, for that one connection; every other
python-xlib user in the process keeps the library's own behaviour.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from Xlib import display as xdisplay
from Xlib.support import connect

from backends.vm.xauth import COOKIE_NAME


@dataclass(frozen=True, slots=True)
class XEndpoint:
    """Where one desktop's X server listens and the cookie it wants."""

    display: str
    """The display name clients inside the desktop's sandbox use, e.g. ':103'."""
    socket_path: Path
    """The X socket as this process sees it."""
    cookie: bytes


_pending = threading.local()
_install_lock = threading.Lock()
_installed = False


def open_display(endpoint: XEndpoint) -> xdisplay.Display:
    """A python-xlib connection to `endpoint` (blocking: call it in a worker thread).

    Raises:
        ConnectionError: the socket is missing or refuses the connection.
        Xlib.error.DisplayError: the X server refused us (wrong cookie).
    """
    _install()
    _pending.endpoint = endpoint
    try:
        return xdisplay.Display(endpoint.display)
    finally:
        _pending.endpoint = None


def _install() -> None:
    global _installed
    with _install_lock:
        if _installed:
            return
        connect.get_socket = _socket_hook(connect.get_socket)
        connect.get_auth = _auth_hook(connect.get_auth)
        _installed = True


def _current() -> XEndpoint | None:
    return getattr(_pending, "endpoint", None)


def _socket_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    def get_socket(dname: str, protocol: str | None, host: str | None, dno: int) -> socket.socket:
        endpoint = _current()
        if endpoint is None:
            found: socket.socket = original(dname, protocol, host, dno)
            return found
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.fspath(endpoint.socket_path))
        except OSError as exc:
            sock.close()
            raise ConnectionError(f"cannot reach the X server of display {endpoint.display}: {exc}") from None
        return sock

    return get_socket


def _auth_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    def get_auth(sock: socket.socket, dname: str, protocol: str | None, host: str | None, dno: int) -> Any:
        endpoint = _current()
        if endpoint is None:
            return original(sock, dname, protocol, host, dno)
        return COOKIE_NAME, endpoint.cookie

    return get_auth
