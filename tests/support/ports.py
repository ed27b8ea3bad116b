"""Free TCP ports on the loopback interface."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port free on 127.0.0.1 right now (another process can take it before it is bound: retry on EADDRINUSE)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def trickle_headers(port: int, path: str, *, every: float, rounds: int) -> str:
    """A slowloris client: send a request's headers one line per `every` seconds, never ending them.

    Returns "closed" once the server cuts the connection, "still open" after `rounds` lines.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
        sock.settimeout(every)
        for _ in range(rounds):
            try:
                sock.sendall(b"X-Slow: y\r\n")
                if sock.recv(1024) == b"":
                    return "closed"
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                return "closed"
        return "still open"
