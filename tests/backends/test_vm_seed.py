"""The seed document's `vm` snippets, run as written through `Sandbox` (in-process MCP server)."""

from __future__ import annotations

import base64
import io
import os
import shutil
import uuid
from pathlib import Path

import anyio
import pytest
from PIL import Image as PILImage

from sandbox import Sandbox
from tests.support.leaks import session_pids
from tests.support.manifests import write_manifest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not all(shutil.which(p) for p in ("Xvfb", "openbox")), reason="needs apt packages xvfb openbox"),
]


@pytest.fixture
def vm_manifest(tmp_path: Path) -> Path:
    return write_manifest(tmp_path, resources={"vm": {"enabled": True, "config": {}}})


def _size(result: dict) -> tuple[int, int]:
    image = PILImage.open(io.BytesIO(base64.b64decode(result["data"]["image"])))
    return image.size


def _vm_pids(worker: str) -> list[int]:
    """Live processes of this worker's vm sessions.

    The server names a `_meta`-keyed worker `key:<id>`; the vm tags its processes
    `vm-<that, made filename-safe>-...`.
    """
    return session_pids(tag_prefix=f"vm-key_{worker}")


def _worker() -> str:
    """A worker id whose processes are recognisable (the vm tags processes `vm-<worker>-...`)."""
    return f"seedvm{uuid.uuid4().hex[:12]}"


async def test_seed_vm_session_explicit_mode_and_reinitialize(vm_manifest: Path) -> None:
    worker = _worker()
    async with Sandbox(manifest=vm_manifest, worker_id=worker) as sandbox:
        await sandbox.create_session("vm", {"screen_size": [1920, 1080], "custom_name": "my_vm"})
        assert len(_vm_pids(worker)) >= 2  # Xvfb and the window manager
        shot = await sandbox.execute("vm:screenshot", {})
        assert shot["code"] == 0, shot
        assert _size(shot) == (1920, 1080)
        assert (shot["data"]["width"], shot["data"]["height"]) == (1920, 1080)
        click = await sandbox.execute("vm:click", {"x": 100})
        assert click["code"] == 0, click
        assert click["data"]["x"] == 100
        typed = await sandbox.execute("vm:type", {"text": "hello"})
        assert typed["code"] == 0, typed
        assert {shot["meta"]["session_id"], click["meta"]["session_id"]} == {typed["meta"]["session_id"]}

        result = await sandbox.reinitialize("vm", {"screen_size": [2560, 1440]})
        assert result["old_session_id"] != result["new_session_id"]
        assert _size(await sandbox.execute("vm:screenshot", {})) == (2560, 1440)

        off = await sandbox.execute("vm:click", {"x": 5000, "y": 10})
        assert off["code"] == 1002
        assert "2560x1440" in off["message"]
        await sandbox.destroy_session("vm")
        assert _vm_pids(worker) == []


async def test_seed_vm_temporary_screenshot_leaves_nothing(vm_manifest: Path) -> None:
    worker = _worker()
    async with Sandbox(manifest=vm_manifest, worker_id=worker) as sandbox:
        shot = await sandbox.execute("vm:screenshot", {})
        assert shot["code"] == 0, shot
        assert shot["meta"]["temporary_session"] is True
        assert _size(shot) == (1280, 800)
        assert _vm_pids(worker) == []


async def test_closing_the_client_destroys_its_desktop(vm_manifest: Path) -> None:
    worker = _worker()
    async with Sandbox(manifest=vm_manifest, worker_id=worker) as sandbox:
        await sandbox.create_session("vm", {"startup": ["xterm"]})
        assert len(_vm_pids(worker)) >= 3  # Xvfb, window manager, xterm
    assert _vm_pids(worker) == []


async def test_a_desktop_refuses_clients_without_its_cookie(vm_manifest: Path) -> None:
    """Another session's apps (or any local process) cannot reach this desktop."""
    async with Sandbox(manifest=vm_manifest) as sandbox:
        await sandbox.create_session("vm")
        display = (await sandbox.list_sessions())["sessions"][0]["details"]["display"]
        stranger = {k: v for k, v in os.environ.items() if k != "XAUTHORITY"} | {"XAUTHORITY": "/dev/null"}
        refused = await anyio.run_process(["xdpyinfo", "-display", display], env=stranger, check=False)
        assert refused.returncode != 0
        assert b"Authorization required" in refused.stderr
        launched = await sandbox.execute("vm:launch", {"command": "xterm -T own-app"})
        assert launched["code"] == 0, launched  # the session's own apps hold the cookie
