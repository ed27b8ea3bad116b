"""vm and browser through the whole stack: seed snippets unchanged, and no process left behind.

Every test snapshots this run's processes first and checks, at the end of each lifecycle
(destroy, TTL expiry, disconnect, shutdown), that no Xvfb, window manager, launched app
or Chromium process it caused is still alive. Only this run's processes count
(tests/support/leaks.py): other runs on the machine start their own Xvfb and Chromium.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import anyio
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from PIL import Image

from sandbox import Sandbox
from tests.support import leaks, procs
from tests.support.polling import eventually
from tests.support.servers import start_http_server

pytestmark = pytest.mark.slow

WATCHED = {"Xvfb", "openbox", "xterm", "chromium", "chrome_crashpad", "headless_shell", "xclock"}


def watched_pids() -> set[int]:
    """This run's live desktop and browser processes (sessions' trees and this process's descendants)."""
    found = set()
    for pid in leaks.run_pids():
        comm = procs.name(pid)
        if comm in WATCHED or comm.startswith("chrom"):
            found.add(pid)
    return found


async def no_new_processes(before: set[int], within: float = 15.0) -> None:
    await eventually(lambda: not (watched_pids() - before), within)


def manifest(tmp_path: Path, ttl: float = 300) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(
        json.dumps(
            {
                "server": {"session_ttl": ttl, "disconnect_grace": 0, "log_level": "WARNING"},
                "resources": {"bash": {}, "vm": {}, "browser": {}},
            }
        )
    )
    return path


def png_size(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


PAGE = "data:text/html,<title>T</title><h1>Hello</h1><button onclick=\"document.title='clicked'\">Go</button>"


async def test_the_seed_vm_snippets_run_unchanged_and_leave_nothing():
    before = watched_pids()
    async with Sandbox() as sandbox:
        await sandbox.create_session("vm", {"screen_size": [1920, 1080], "custom_name": "my_vm"})
        shot = await sandbox.execute("vm:screenshot", {})
        assert shot["code"] == 0
        assert png_size(shot["data"]["image"]) == (1920, 1080)
        assert (await sandbox.execute("vm:click", {"x": 100}))["code"] == 0
        assert (await sandbox.execute("vm:type", {"text": "hello"}))["code"] == 0
        result = await sandbox.reinitialize("vm", {"screen_size": [2560, 1440]})
        assert result["status"] == "success"
        assert result["config_applied"] == {"screen_size": [2560, 1440]}
        shot = await sandbox.execute("vm:screenshot", {})
        assert png_size(shot["data"]["image"]) == (2560, 1440)
        assert shot["meta"]["session_id"] == result["new_session_id"]
        await sandbox.create_session(["vm", "bash"])
        listed = {s["resource_type"]: s for s in (await sandbox.list_sessions())["sessions"]}
        assert listed["vm"]["session_name"] == "my_vm"
        assert set(listed) == {"vm", "bash"}
        await sandbox.destroy_session("vm")
        await no_new_processes(before)  # the desktop is gone at once; bash has no watched process
        temp = await sandbox.execute("vm:screenshot", {})
        assert temp["meta"]["temporary_session"] is True
        assert png_size(temp["data"]["image"]) == (1280, 800)
    await no_new_processes(before)


async def test_vm_launched_apps_die_with_the_session_on_destroy():
    before = watched_pids()
    async with Sandbox() as sandbox:
        await sandbox.create_session("vm", {"startup": [["xterm"]]})
        launched = await sandbox.execute("vm:launch", {"command": "xterm -T second"})
        assert launched["code"] == 0, launched
        await eventually(lambda: len(watched_pids() - before) >= 4, 10)  # Xvfb, openbox, two xterms
        await sandbox.destroy_session("vm")
        await no_new_processes(before)


async def test_ttl_expiry_reaps_desktop_and_browser_context(tmp_path):
    before = watched_pids()
    async with Sandbox(manifest=manifest(tmp_path, ttl=1.5)) as sandbox:
        await sandbox.create_session({"vm": None, "browser": {"viewport": [800, 600]}})
        nav = await sandbox.execute("browser:navigate", {"url": PAGE})
        assert nav["code"] == 0, nav

        async def all_reaped() -> bool:
            # listed sessions go first; the count drops once each cleanup has finished
            return (
                not (await sandbox.list_sessions())["sessions"] and (await sandbox.get_status())["live_sessions"] == 0
            )

        await eventually(all_reaped, 15)
        # the desktop is gone; the shared browser stays warm for the next session
        again = await sandbox.execute("browser:navigate", {"url": PAGE})
        assert again["meta"]["temporary_session"] is True
    await no_new_processes(before)


async def test_browser_temporary_mode_and_reinitialize_viewport():
    before = watched_pids()
    async with Sandbox() as sandbox:
        temp = await sandbox.execute("browser:navigate", {"url": PAGE})
        assert temp["code"] == 0, temp
        assert temp["meta"]["temporary_session"] is True
        shot = await sandbox.execute("browser:screenshot", {})
        assert shot["meta"]["temporary_session"] is True
        assert shot["meta"]["session_id"] != temp["meta"]["session_id"]
        await sandbox.create_session("browser", {"viewport": [800, 600]})
        await sandbox.execute("browser:navigate", {"url": PAGE})
        snap = await sandbox.execute("browser:snapshot", {})
        assert "Hello" in json.dumps(snap["data"])
        assert png_size((await sandbox.execute("browser:screenshot", {}))["data"]["image"]) == (800, 600)
        await sandbox.reinitialize("browser", {"viewport": [1024, 700]})
        await sandbox.execute("browser:navigate", {"url": PAGE})
        assert png_size((await sandbox.execute("browser:screenshot", {}))["data"]["image"]) == (1024, 700)
    await no_new_processes(before)  # server shutdown closes the shared Chromium too


async def test_http_client_disconnect_destroys_its_desktop_and_context_while_the_server_lives(tmp_path):
    before = watched_pids()
    server = await anyio.to_thread.run_sync(lambda: start_http_server(tmp_path, manifest=manifest(tmp_path)))
    try:
        async with (
            server.http_client() as http,
            Client(streamable_http_client(server.mcp_url, http_client=http), mode="legacy") as client,
        ):  # Mcp-Session-Id
            created = await client.call_tool("create_session", {"resource": ["vm", "browser"]})
            assert not created.is_error, created
            nav = await client.call_tool("browser_navigate", {"url": PAGE})
            assert not nav.is_error
            shot = await client.call_tool("vm_screenshot", {})
            assert any(c.type == "image" for c in shot.content)
            assert len(watched_pids() - before) >= 3
        # leaving the client sends DELETE: the worker's desktop and context go, the server stays
        await eventually(lambda: not any(_comm(p) in {"Xvfb", "openbox"} for p in watched_pids() - before))
        assert server.process.poll() is None
    finally:
        await anyio.to_thread.run_sync(server.stop)
    await no_new_processes(before)


def _comm(pid: int) -> str:
    return procs.name(pid)
