"""The seed document's `vm` snippets, run as written through `Sandbox` (in-process MCP server)."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import anyio
import pytest
from PIL import Image as PILImage

from sandbox import Sandbox
from session.errors import ConfigurationError, PermissionDenied
from tests.backends.vm_harness import alive
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


async def _desktop_pids(sandbox: Sandbox) -> list[int]:
    """Live processes of this client's vm sessions, as the server reports them (sandbox membership)."""
    sessions = (await sandbox.list_sessions())["sessions"]
    return [pid for s in sessions if s["resource_type"] == "vm" for pid in s["details"]["pids"] if alive(pid)]


async def _gone(pids: list[int]) -> bool:
    with anyio.fail_after(15):
        while [p for p in pids if alive(p)]:  # noqa: ASYNC110 - nothing to wait on for another's exit
            await anyio.sleep(0.05)
    return True


async def test_seed_vm_session_explicit_mode_and_reinitialize(vm_manifest: Path) -> None:
    async with Sandbox(manifest=vm_manifest) as sandbox:
        await sandbox.create_session("vm", {"screen_size": [1920, 1080], "custom_name": "my_vm"})
        first = await _desktop_pids(sandbox)
        assert len(first) >= 2  # Xvfb and the window manager (and their sandbox wrappers)
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
        assert await _gone(first)

        off = await sandbox.execute("vm:click", {"x": 5000, "y": 10})
        assert off["code"] == 1002
        assert "2560x1440" in off["message"]
        second = await _desktop_pids(sandbox)
        await sandbox.destroy_session("vm")
        assert await _gone(second)


async def test_seed_vm_temporary_screenshot(vm_manifest: Path) -> None:
    async with Sandbox(manifest=vm_manifest) as sandbox:
        shot = await sandbox.execute("vm:screenshot", {})
        assert shot["code"] == 0, shot
        assert shot["meta"]["temporary_session"] is True
        assert _size(shot) == (1280, 800)
        assert await _desktop_pids(sandbox) == []


async def test_closing_the_client_destroys_its_desktop(vm_manifest: Path) -> None:
    async with Sandbox(manifest=vm_manifest) as sandbox:
        await sandbox.create_session("vm", {"startup": ["xterm"]})
        pids = await _desktop_pids(sandbox)
        assert len(pids) >= 3  # Xvfb, window manager, xterm
    assert await _gone(pids)


async def test_a_desktop_is_not_reachable_by_its_display_name_from_the_host(vm_manifest: Path) -> None:
    """Its socket is in the session's own directory, never /tmp/.X11-unix or an abstract socket."""
    async with Sandbox(manifest=vm_manifest) as sandbox:
        await sandbox.create_session("vm")
        details = (await sandbox.list_sessions())["sessions"][0]["details"]
        assert details["sandbox"]["tier"] == "sandbox"
        launched = await sandbox.execute("vm:launch", {"command": "xterm -T own-app"})
        assert launched["code"] == 0, launched  # the session's own apps hold the cookie
        assert launched["data"]["window"]["title"] == "own-app"
        stranger = {"PATH": "/usr/bin:/bin", "XAUTHORITY": "/dev/null", "DISPLAY": details["display"]}
        refused = await anyio.run_process(["xdpyinfo"], env=stranger, check=False)
        assert refused.returncode != 0


async def test_policy_requests_a_desktop_cannot_honour_or_may_not_get_are_refused(vm_manifest: Path) -> None:
    async with Sandbox(manifest=vm_manifest) as sandbox:
        with pytest.raises(ConfigurationError, match="gvisor") as gvisor:
            await sandbox.create_session("vm", {"isolation": "gvisor"})  # tighter, but no X socket under runsc
        assert gvisor.value.code == 5001
        with pytest.raises(PermissionDenied, match="isolation") as looser:
            await sandbox.create_session("vm", {"isolation": "none"})  # looser than the operator's policy
        assert looser.value.code == 1006
        assert (await sandbox.list_sessions())["sessions"] == []
