"""A headed browser drawn on a vm desktop, through the ray executor, on a real one-node cluster.

The two resources link (`browser.display` names a vm session), so one host actor per node runs
both (`host-browser+vm-<node>`). One node advertising both is enough, so this runs on a single
loopback node (tests/support/ray_cluster.py), outside the two-node private network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.backends.vm_harness import needs_desktop
from tests.cluster.helpers import sandbox
from tests.support import leaks
from tests.support.polling import eventually
from tests.support.ray_cluster import RayHead, start_head, stop_head
from tests.support.ray_multinode import executor_missing, ray_missing
from tests.support.servers import ServerProcess, start_http_server

pytestmark = [pytest.mark.slow, needs_desktop]

HOST_IDLE_EXIT = 3.0


@pytest.fixture
def head(tmp_path: Path) -> Iterator[RayHead]:
    reason = ray_missing() or executor_missing()
    if reason is not None:
        pytest.skip(reason)
    started = start_head(tmp_path / "ray", resources=("vm", "browser"))
    try:
        yield started
    finally:
        stop_head(started)


@pytest.fixture
def front_end(head: RayHead, tmp_path: Path) -> Iterator[ServerProcess]:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "server": {"session_ttl": 300, "log_level": "WARNING", "ray_host_idle_exit": HOST_IDLE_EXIT},
                "resources": {"vm": {"enabled": True}, "browser": {"enabled": True}},
            }
        )
    )
    server = start_http_server(
        tmp_path,
        manifest=manifest,
        extra_args=("--executor", "ray", "--ray-address", head.address),
        base_env={**os.environ, **head.env},
    )
    try:
        yield server
    finally:
        server.stop()


def desktop_and_browser_pids() -> list[int]:
    """This run's vm and browser session processes (Chromium's helpers found as descendants)."""
    return sorted(
        {
            *leaks.session_pids(tag_prefix="vm-", with_descendants=True),
            *leaks.session_pids(tag_prefix="browser-", with_descendants=True),
        }
    )


async def test_a_headed_browser_shows_on_a_vm_desktop_in_one_host_and_leaves_nothing(
    head: RayHead, front_end: ServerProcess
) -> None:
    assert desktop_and_browser_pids() == []  # the control: no desktop or browser of this run yet
    with anyio.fail_after(240):
        async with sandbox(front_end) as worker:
            vm = await worker.create_session("vm")
            await worker.create_session("browser", {"headless": False, "display": vm["session_id"]})
            listing = await worker.list_sessions()
            hosts = {s["resource_type"]: s["details"]["host"] for s in listing["sessions"]}
            assert hosts["vm"] == hosts["browser"], hosts
            assert hosts["vm"].startswith("host-browser+vm-"), hosts
            page = "data:text/html,<title>on the desktop</title><h1>HELLO</h1>"
            went = await worker.execute("browser:navigate", {"url": page})
            assert went["data"]["title"] == "on the desktop", went

            async def on_desktop() -> dict[str, Any] | None:
                shot = await worker.execute("vm:screenshot", {})
                assert shot["code"] == 0, shot
                return shot if "on the desktop" in str(shot["data"].get("active_window") or "") else None

            await eventually(on_desktop, 60, every=0.5, what="the browser window on the vm desktop")
            # The control for the end: both kinds are seen while they live (Xvfb; Chromium).
            assert leaks.session_pids(tag_prefix="vm-"), "no vm process seen while the desktop lives"
            assert leaks.session_pids(tag_prefix="browser-"), "no Chromium process seen while the browser lives"
            await worker.destroy_session(["browser", "vm"])
    front_end.stop()
    # The sessions are gone at once; the node's shared Chromium goes with its host (idle, no front end).
    await eventually(
        lambda: not desktop_and_browser_pids(),
        120,
        every=0.5,
        what=lambda: f"the desktop's and the browser's processes to end; alive: {desktop_and_browser_pids()}",
    )
