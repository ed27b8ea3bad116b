"""Shared test helpers: the process table, manifests, free ports."""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from backends.processes import SESSION_ENV_MARKER


def marked_pids(prefix: str = "") -> list[int]:
    """Live processes whose environment carries the session marker (optionally a tag prefix)."""
    needle = f"{SESSION_ENV_MARKER}={prefix}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(item.startswith(needle) for item in env.split(b"\0")):
            found.append(int(entry.name))
    return found


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], within: float = 15.0, every: float = 0.05
) -> None:
    """Poll until `condition` holds; fail after `within` seconds.

    The process table and the reaper offer nothing to wait on, so polling with a
    deadline is the honest way to observe them (never a fixed sleep).
    """
    with anyio.fail_after(within):
        while True:
            result = condition()
            if isinstance(result, Awaitable):
                result = await result
            if result:
                return
            await anyio.sleep(every)


async def wait_until_no_marked(prefix: str, within: float = 10.0) -> None:
    """Poll the process table until no process carries the marker (fails after `within`)."""
    await eventually(lambda: not marked_pids(prefix), within)


def write_manifest(directory: Path, *, ttl: float = 300, resources: dict[str, Any] | None = None) -> Path:
    path = directory / "manifest.json"
    payload = {
        "server": {"session_ttl": ttl},
        "resources": resources or {"bash": {"enabled": True, "config": {"timeout": 20}}},
    }
    path.write_text(json.dumps(payload))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def bash_manifest(tmp_path: Path) -> Path:
    return write_manifest(tmp_path)
