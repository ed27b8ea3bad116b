"""Sessions on a real two-node Ray cluster behind two front ends (`serve --executor ray`).

One cluster and two front ends (A and B, sharing a token) for the module: none of these tests
breaks them (the fault tests, which do, start their own: tests/cluster/test_faults.py).
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from tests.backends.vm_harness import needs_desktop
from tests.cluster.helpers import (
    STATE_CHECK,
    STATE_COMMAND,
    call,
    sandbox,
    sessions_by_id,
    stateless_client,
)
from tests.support import leaks
from tests.support.polling import eventually
from tests.support.ray_multinode import HEAD_PORT, RayCluster
from tests.support.servers import TOKEN_ENV, ServerProcess, server_command

pytestmark = pytest.mark.slow

#: server.ray_host_idle_exit of the module's front ends (default 60 s).
HOST_IDLE_EXIT = 3.0


@pytest.fixture(scope="module")
def front_ends(
    ray_cluster: RayCluster, ray_executor: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    directory = tmp_path_factory.mktemp("front-ends")
    # Hosts exit soon once idle with no front end, so the last test of the module need not wait long.
    manifest = ray_cluster.manifest(directory, browser=True, host_idle_exit=HOST_IDLE_EXIT)
    a = ray_cluster.start_front_end(directory, manifest)
    b = ray_cluster.start_front_end(directory, manifest)
    yield a, b
    ray_cluster.stop_front_ends()


async def test_sessions_are_placed_on_both_nodes(
    ray_cluster: RayCluster, front_ends: tuple[ServerProcess, ServerProcess]
) -> None:
    """Sessions spread over the nodes; `list_sessions` details name each one's node and host actor."""
    a_node, b_node = ray_cluster.nodes["a"].node_id, ray_cluster.nodes["b"].node_id
    with anyio.fail_after(120):
        async with stateless_client(front_ends[0]) as client:
            handles: list[str] = []
            placed: dict[str, str] = {}
            # Least sessions first: a few sessions must cover both nodes.
            for _ in range(4):
                created = await call(client, "create_session", {"resource": "bash"})
                assert created["code"] == 0, created
                handles.append(created["data"]["session_id"])
                listing = await call(client, "list_sessions", {"all": True})
                placed = {h: s["details"]["node_id"] for h, s in sessions_by_id(listing["data"]).items()}
                if {placed.get(h) for h in handles} >= {a_node, b_node}:
                    break
            assert set(placed) >= set(handles)
            assert {placed[h] for h in handles} == {a_node, b_node}, (placed, a_node, b_node)
            details = sessions_by_id(listing["data"])[handles[0]]["details"]
            assert details["host"], details
            # Each session really runs on its node: its shell answers from there.
            for handle in handles:
                ran = await call(client, "bash_run", {"command": "echo alive", "session_id": handle})
                assert ran["code"] == 0, ran
                assert ran["data"]["stdout"] == "alive\n"
            for handle in handles:
                assert (await call(client, "destroy_session", {"session_id": handle}))["code"] == 0
            listing = await call(client, "list_sessions", {"all": True})
            assert not set(handles) & set(sessions_by_id(listing["data"]))


async def test_a_session_made_through_one_front_end_is_used_through_the_other(
    front_ends: tuple[ServerProcess, ServerProcess],
) -> None:
    """Created through A; through B by handle (the `Sandbox` client and a plain 2026-07-28 client)
    and by the same worker key, its shell state kept; destroyed through B (closing that worker), gone
    through A."""
    a, b = front_ends
    with anyio.fail_after(120):
        async with sandbox(a) as on_a:
            handle = (await on_a.create_session("bash"))["session_id"]
            first = await on_a.execute("bash:run", {"command": STATE_COMMAND})
            assert first["code"] == 0, first
            assert first["meta"]["session_id"] == handle
            tag = first["data"]["stdout"].strip()
            async with sandbox(b) as on_b:
                by_handle = await on_b.execute("bash:run", {"command": STATE_CHECK, "session_id": handle})
                assert by_handle["code"] == 0, by_handle
                assert by_handle["data"]["stdout"] == f"/tmp kept-42 {tag}\n"
            async with stateless_client(b) as plain:
                raw = await call(plain, "bash_run", {"command": STATE_CHECK, "session_id": handle})
                assert raw["code"] == 0, raw
                assert raw["data"]["stdout"] == f"/tmp kept-42 {tag}\n", raw
                assert raw["meta"]["temporary_session"] is False
            # The same worker key through B: its session without a handle; closing that worker destroys it.
            async with sandbox(b, worker_id=on_a.worker_id) as same_worker:
                by_key = await same_worker.execute("bash:run", {"command": STATE_CHECK})
                assert by_key["meta"]["session_id"] == handle, by_key
                assert by_key["data"]["stdout"] == f"/tmp kept-42 {tag}\n"
            await leaks.wait_gone(tag, within=30)
            gone = await on_a.execute("bash:run", {"command": "true", "session_id": handle})
            assert gone["code"] == 1003, gone


async def test_temporary_sessions_and_unknown_handles_behave_as_on_one_machine(
    front_ends: tuple[ServerProcess, ServerProcess],
) -> None:
    """A call without a session is temporary (its processes gone when it returns); an unknown handle is 1003."""
    with anyio.fail_after(60):
        async with stateless_client(front_ends[1]) as client:
            temporary = await call(client, "bash_run", {"command": 'echo "$AGENTFLOW_SESSION"'})
            assert temporary["code"] == 0, temporary
            assert temporary["meta"]["temporary_session"] is True
            assert leaks.session_pids(temporary["data"]["stdout"].strip()) == []
            unknown = await call(client, "bash_run", {"command": "true", "session_id": "x" * 43})
            assert unknown["code"] == 1003, unknown


async def test_sessions_cannot_reach_the_ray_ports(
    ray_cluster: RayCluster, front_ends: tuple[ServerProcess, ServerProcess]
) -> None:
    """Ray has no authentication: a shell in the default sandbox tier cannot connect to the GCS or a raylet,
    which the test thread (on the nodes' network) can."""
    ports = sorted({HEAD_PORT, *ray_cluster.nodes["a"].ray_ports(), *ray_cluster.nodes["b"].ray_ports()})
    for port in ports:  # the control: these are live listeners on the nodes' loopback
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass
    probe = "; ".join(
        f"if (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null; then echo open {port}; else echo closed {port}; fi"
        for port in ports
    )
    with anyio.fail_after(120):
        async with stateless_client(front_ends[0]) as client:
            handles = []
            for _ in range(2):  # on both nodes, by the spread
                created = await call(client, "create_session", {"resource": "bash"})
                assert created["code"] == 0, created
                handles.append(created["data"]["session_id"])
            for handle in handles:
                ran = await call(client, "bash_run", {"command": probe, "session_id": handle})
                assert ran["code"] == 0, ran
                assert ran["data"]["stdout"].split("\n")[:-1] == [f"closed {p}" for p in ports], ran["data"]
            for handle in handles:
                await call(client, "destroy_session", {"session_id": handle})


async def test_browser_pages_cannot_reach_the_ray_ports(
    ray_cluster: RayCluster, front_ends: tuple[ServerProcess, ServerProcess]
) -> None:
    """A browser session (only node a advertises `agentflow.browser`) cannot open Ray's ports: the proxy refuses."""
    ports = sorted({HEAD_PORT, *ray_cluster.nodes["a"].ray_ports()})
    with anyio.fail_after(150):
        async with stateless_client(front_ends[1]) as client:
            created = await call(client, "create_session", {"resource": "browser"})
            assert created["code"] == 0, created
            handle = created["data"]["session_id"]
            listing = await call(client, "list_sessions", {"all": True})
            assert sessions_by_id(listing["data"])[handle]["details"]["node_id"] == ray_cluster.nodes["a"].node_id
            try:
                for port in ports:
                    for url in (f"http://127.0.0.1:{port}/", f"http://localhost:{port}/"):
                        went = await call(client, "browser_navigate", {"url": url, "session_id": handle})
                        assert went["code"] == 1006, (url, went)
            finally:
                await call(client, "destroy_session", {"session_id": handle})


def test_a_generated_token_is_refused_with_the_ray_executor(
    ray_cluster: RayCluster, ray_executor: None, tmp_path: Path
) -> None:
    """Front ends must share their tokens: with no configured token, `--executor ray` does not start (exit 2)."""
    manifest = ray_cluster.manifest(tmp_path)
    env = {k: v for k, v in ray_cluster.env.items() if k != TOKEN_ENV}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    argv = [*server_command(), "serve", "--transport", "http", "--port", "18991", "--manifest", str(manifest)]
    argv += ["--executor", "ray", "--ray-address", ray_cluster.address]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result
    assert "token" in result.stderr.lower(), result.stderr
    assert TOKEN_ENV in result.stderr, result.stderr
    assert not (tmp_path / "state" / "agentflow-sandbox").exists()  # no token file was generated


def vm_manifest(ray_cluster: RayCluster, directory: Path) -> Path:
    """The cluster's front-end manifest plus `vm` (default config, default `sandbox` tier)."""
    path = ray_cluster.manifest(directory, host_idle_exit=HOST_IDLE_EXIT)
    manifest = json.loads(path.read_text())
    manifest["resources"]["vm"] = {"enabled": True}
    path.write_text(json.dumps(manifest))
    return path


@needs_desktop
async def test_a_vm_desktop_lives_on_its_node_and_leaves_nothing(ray_cluster: RayCluster, tmp_path: Path) -> None:
    """A vm session through the ray executor: placed on node b (the only one advertising `agentflow.vm`),
    its Xvfb desktop answers screenshots and pointer moves, and destroying it leaves none of its processes."""
    assert leaks.session_pids(tag_prefix="vm-") == []  # the control: this run has no desktop yet
    front_end = ray_cluster.start_front_end(tmp_path, vm_manifest(ray_cluster, tmp_path))
    with anyio.fail_after(180):
        async with stateless_client(front_end) as client:
            created = await call(client, "create_session", {"resource": "vm"})
            assert created["code"] == 0, created
            handle = created["data"]["session_id"]
            try:
                listing = await call(client, "list_sessions", {"all": True})
                details = sessions_by_id(listing["data"])[handle]["details"]
                assert details["node_id"] == ray_cluster.nodes["b"].node_id, details
                assert details["host"].startswith("host-"), details
                pids = leaks.session_pids(tag_prefix="vm-")
                assert "Xvfb" in {psutil.Process(pid).name() for pid in pids}, pids

                shot = await call(client, "vm_screenshot", {"session_id": handle})
                assert shot["code"] == 0, shot
                assert shot["data"]["width"] > 0, shot["data"]
                assert shot["data"]["height"] > 0, shot["data"]
                moved = await call(client, "vm_move", {"x": 17, "y": 23, "session_id": handle})
                assert moved["code"] == 0, moved
                where = await call(client, "vm_cursor_position", {"session_id": handle})
                assert (where["data"]["x"], where["data"]["y"]) == (17, 23), where
            finally:
                destroyed = await call(client, "destroy_session", {"session_id": handle})
            assert destroyed["code"] == 0, destroyed
            await leaks.wait_gone(tag_prefix="vm-", within=60)
            gone = await call(client, "vm_screenshot", {"session_id": handle})
            assert gone["code"] == 1003, gone


def edited_manifest(path: Path, server: dict[str, Any], resources: dict[str, dict[str, Any]]) -> Path:
    """`path` (a cluster front-end manifest) with more `server` settings and resource settings."""
    manifest = json.loads(path.read_text())
    manifest["server"].update(server)
    for name, settings in resources.items():
        manifest["resources"].setdefault(name, {}).update(settings)
    path.write_text(json.dumps(manifest))
    return path


async def test_each_host_keeps_a_warm_pool_that_creates_take_from_and_that_ends_with_it(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    """Bash with `pool = 2` in a deployment of its own: each node's host fills its pool (get_status shows
    it per host), creates through the front end take members, and once the front end is gone the hosts
    exit and neither their sessions nor their pool members leave a process."""
    deployment = "pooled"
    manifest = edited_manifest(
        ray_cluster.manifest(tmp_path, host_idle_exit=HOST_IDLE_EXIT),
        {"deployment": deployment},
        {"bash": {"pool": 2, "pool_max": 2}},
    )
    front_end = ray_cluster.start_front_end(tmp_path, manifest)
    labels: set[str] = set()
    with anyio.fail_after(180):
        async with stateless_client(front_end) as client:

            async def pools() -> list[dict[str, Any]]:
                status = await call(client, "get_status", {})
                assert status["code"] == 0, status
                found = [h["warm_pools"]["bash"] for h in status["data"]["hosts"] if "warm_pools" in h]
                for pool in found:
                    labels.update(pool["members"])
                return found

            async def full() -> list[dict[str, Any]] | None:
                found = await pools()
                return found if len(found) == 2 and all(p["ready"] == 2 for p in found) else None

            handles = []
            for _ in range(2):  # one on each node (fewest sessions first): both hosts and their pools start
                created = await call(client, "create_session", {"resource": "bash"})
                assert created["code"] == 0, created
                handles.append(created["data"]["session_id"])
            before = await eventually(full, 120, every=0.5, what="both hosts' pools to hold 2 ready shells")
            for _ in range(2):
                created = await call(client, "create_session", {"resource": "bash"})
                assert created["code"] == 0, created
                handles.append(created["data"]["session_id"])
            after = await pools()
            assert sum(p["taken"] for p in after) >= sum(p["taken"] for p in before) + 2, (before, after)
            for handle in handles:
                ran = await call(client, "bash_run", {"command": 'echo "$AGENTFLOW_SESSION"', "session_id": handle})
                assert ran["code"] == 0, ran
                labels.add(ran["data"]["stdout"].strip())
                assert (await call(client, "destroy_session", {"session_id": handle}))["code"] == 0
            await pools()
    front_end.stop()
    ray_cluster.front_ends.remove(front_end)

    def hosts() -> list[str]:
        return [name for name in ray_cluster.named_actors(deployment) if name.startswith("host-")]

    # (The deployment's registry stays: it lives as long as the cluster.)
    await eventually(lambda: not hosts(), 120, every=1.0, what=lambda: f"the pooled hosts to exit; left: {hosts()}")
    assert len(labels) >= 6, labels  # the 4 sessions and at least the pools' 4 members
    for label in labels:
        await leaks.wait_gone(label, within=30)


async def test_session_hosts_exit_when_nothing_is_left(
    ray_cluster: RayCluster, front_ends: tuple[ServerProcess, ServerProcess]
) -> None:
    """Last of the module: no session left, front ends stopped -> every session-host actor exits by itself."""
    with anyio.fail_after(60):
        async with stateless_client(front_ends[0]) as client:
            # (Sessions a failed test above left behind must not fail this test too.)
            for left in (await call(client, "list_sessions", {"all": True}))["data"]["sessions"]:
                await call(client, "destroy_session", {"session_id": left["session_id"]})
            listing = await call(client, "list_sessions", {"all": True})
            assert listing["data"]["sessions"] == [], listing
    ray_cluster.stop_front_ends()

    def hosts() -> list[str]:
        return [name for name in ray_cluster.named_actors() if name.startswith("host-")]

    await eventually(lambda: not hosts(), 120, every=1.0, what=lambda: f"session hosts to exit; left: {hosts()}")
    assert leaks.session_pids(test_marker=ray_cluster.run_marker) == []
