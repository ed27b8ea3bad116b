"""Faults on a real Ray cluster: a front end SIGKILLed, a node lost, the cluster down at a front end's start.

Each test breaks something, so each starts its own cluster in its own private network namespace.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from tests.cluster.helpers import (
    STATE_CHECK,
    STATE_COMMAND,
    LegacyConnection,
    call,
    sandbox,
    sessions_by_id,
    stateless_client,
)
from tests.support import leaks, netns
from tests.support.netns import PrivateNetwork
from tests.support.polling import eventually
from tests.support.ray_multinode import RayCluster, ray_missing, wait_no_leftovers

pytestmark = pytest.mark.slow

#: Ray declares a node with a SIGKILLed raylet dead after ~12-15 s here; the rest is slack for a busy machine.
NODE_DEATH_WITHIN = 120.0
#: A dead front end's lease lapses, then its connections' sessions sit out the grace (3 s here).
LEASE_AND_GRACE_WITHIN = 120.0


@pytest.fixture
def network(ray_executor: None) -> Iterator[PrivateNetwork]:
    reason = netns.available() or ray_missing()
    if reason is not None:
        pytest.skip(reason)
    with PrivateNetwork() as private:
        yield private
        stray = private.stray_threads()
    assert not stray, f"threads left inside the cluster's network namespace: {stray}"


@pytest.fixture
def cluster(network: PrivateNetwork) -> Iterator[RayCluster]:
    started = RayCluster.create(network)
    try:
        yield started
    finally:
        started.stop()
    wait_no_leftovers(started)


async def test_a_front_end_killed_loses_no_session_and_its_connections_sessions_end(
    cluster: RayCluster, tmp_path: Path
) -> None:
    """A SIGKILLed: sessions known by handle or worker key are served by B with their state; the session
    of a connection held to A enters the disconnect grace (A's lease lapses) and ends, long before its TTL."""
    cluster.start_nodes()
    manifest = cluster.manifest(tmp_path, disconnect_grace=3.0, session_ttl=300.0)
    a = cluster.start_front_end(tmp_path, manifest)
    b = cluster.start_front_end(tmp_path, manifest)
    with anyio.fail_after(LEASE_AND_GRACE_WITHIN + 120):
        worker = sandbox(a)
        await worker.start()
        try:
            handle = (await worker.create_session("bash"))["session_id"]
            kept_tag = (await worker.execute("bash:run", {"command": STATE_COMMAND}))["data"]["stdout"].strip()
            async with LegacyConnection(a) as connection:
                created = await connection.call_tool("create_session", {"resource": "bash"})
                assert created["code"] == 0, created
                conn_handle = created["data"]["session_id"]
                ran = await connection.call_tool("bash_run", {"command": STATE_COMMAND})
                assert ran["meta"]["session_id"] == conn_handle, ran
                conn_tag = ran["data"]["stdout"].strip()
                assert a.stop(signal.SIGKILL) == -signal.SIGKILL

                async with sandbox(b, worker_id=worker.worker_id) as same_worker:
                    by_handle = await same_worker.execute("bash:run", {"command": STATE_CHECK, "session_id": handle})
                    assert by_handle["data"]["stdout"] == f"/tmp kept-42 {kept_tag}\n", by_handle
                    by_key = await same_worker.execute("bash:run", {"command": STATE_CHECK})
                    assert by_key["meta"]["session_id"] == handle, by_key

                    # The connection is gone with A: its session ends by the grace, not by the 300 s TTL.
                    await leaks.wait_gone(conn_tag, within=LEASE_AND_GRACE_WITHIN)
                    gone = await same_worker.execute("bash:run", {"command": "true", "session_id": conn_handle})
                    assert gone["code"] == 1003, gone
                    assert leaks.session_pids(kept_tag), "the session held by handle died with the front end"
                    await same_worker.destroy_session("bash")
                    await leaks.wait_gone(kept_tag)
        finally:
            with anyio.move_on_after(30), contextlib.suppress(Exception):
                await worker.close()  # its server is dead: nothing left to destroy through it


async def test_a_lost_node_answers_5002_then_1003_and_the_other_node_keeps_working(
    cluster: RayCluster, tmp_path: Path
) -> None:
    """Node b's raylet SIGKILLed: its session answers 5002 while Ray has not declared the node dead, then
    1003 ("the node running this session was lost") and leaves listings; node a's session keeps working."""
    cluster.start_nodes()
    front_end = cluster.start_front_end(tmp_path, cluster.manifest(tmp_path))
    a_node, b_node = cluster.nodes["a"].node_id, cluster.nodes["b"].node_id
    with anyio.fail_after(NODE_DEATH_WITHIN + 180):
        async with stateless_client(front_end) as client:
            on: dict[str, tuple[str, str]] = {}  # node id -> (handle, session tag)
            for _ in range(6):
                created = await call(client, "create_session", {"resource": "bash"})
                assert created["code"] == 0, created
                handle = created["data"]["session_id"]
                ran = await call(client, "bash_run", {"command": STATE_COMMAND, "session_id": handle})
                listing = await call(client, "list_sessions", {"all": True})
                on.setdefault(
                    sessions_by_id(listing["data"])[handle]["details"]["node_id"],
                    (handle, ran["data"]["stdout"].strip()),
                )
                if set(on) >= {a_node, b_node}:
                    break
            assert set(on) >= {a_node, b_node}, on
            (on_a, tag_a), (on_b, tag_b) = on[a_node], on[b_node]

            cluster.kill_raylet("b")
            seen: list[dict[str, Any]] = []

            async def lost() -> dict[str, Any] | None:
                answer = await call(client, "bash_run", {"command": "true", "session_id": on_b})
                seen.append(answer)
                if answer["code"] == 5002:  # meanwhile node a serves on
                    still = await call(client, "bash_run", {"command": STATE_CHECK, "session_id": on_a})
                    assert still["data"]["stdout"] == f"/tmp kept-42 {tag_a}\n", still
                return answer if answer["code"] == 1003 else None

            final = await eventually(lost, NODE_DEATH_WITHIN, every=0.5, what="node b's session to answer 1003")
            codes = [answer["code"] for answer in seen]
            assert 5002 in codes, codes
            after_first_failure = codes[next(i for i, c in enumerate(codes) if c != 0) :]
            assert set(after_first_failure) <= {5002, 1003}, codes
            unreachable = next(answer for answer in seen if answer["code"] == 5002)
            assert "retry" in unreachable["message"], unreachable
            assert "the node running this session was lost" in final["message"], final
            again = await call(client, "bash_run", {"command": "true", "session_id": on_b})
            assert again["code"] == 1003, again

            listing = await call(client, "list_sessions", {"all": True})
            assert on_b not in sessions_by_id(listing["data"])
            assert sessions_by_id(listing["data"])[on_a]["details"]["node_id"] == a_node
            still = await call(client, "bash_run", {"command": STATE_CHECK, "session_id": on_a})
            assert still["data"]["stdout"] == f"/tmp kept-42 {tag_a}\n", still
            # Nothing of node b's session is left: its processes, its host actor.
            await leaks.wait_gone(tag_b, within=60)
            assert not cluster.node_alive("b")
            assert not [n for n in cluster.named_actors() if n.endswith(b_node)]
            for handle, _ in on.values():
                await call(client, "destroy_session", {"session_id": handle})
            await leaks.wait_gone(tag_a)


async def session_then_cluster_gone(cluster: RayCluster, client: Client) -> str:
    """A session on a one-node cluster, then the node stopped: its calls answer 5002. Returns its handle."""
    created = await call(client, "create_session", {"resource": "bash"})
    assert created["code"] == 0, created
    handle: str = created["data"]["session_id"]
    tag = (await call(client, "bash_run", {"command": STATE_COMMAND, "session_id": handle}))["data"]["stdout"]
    cluster.stop_node("a")
    await leaks.wait_gone(tag.strip(), within=60)
    down = await call(client, "bash_run", {"command": "true", "session_id": handle})
    assert down["code"] == 5002, down
    assert "retry" in down["message"], down
    return handle


async def test_the_cluster_gone_answers_5002(cluster: RayCluster, tmp_path: Path) -> None:
    """Every node stopped: a call answers 5002 (retry), neither a traceback nor a hang."""
    cluster.start_nodes(("a",))
    front_end = cluster.start_front_end(tmp_path, cluster.manifest(tmp_path))
    with anyio.fail_after(150):
        async with stateless_client(front_end) as client:
            await session_then_cluster_gone(cluster, client)
            listing = await call(client, "list_sessions", {"all": True})
            assert listing["code"] == 5002, listing


@pytest.mark.timeout(300)
async def test_a_restarted_cluster_is_served_again_and_old_handles_answer_1003(
    cluster: RayCluster, tmp_path: Path
) -> None:
    """The cluster started again at the same address: the same front end serves new sessions, and the old
    handle answers 1003 (a restarted head has lost its actors)."""
    cluster.start_nodes(("a",))
    front_end = cluster.start_front_end(tmp_path, cluster.manifest(tmp_path))
    with anyio.fail_after(250):
        async with stateless_client(front_end) as client:
            handle = await session_then_cluster_gone(cluster, client)
            cluster.start_nodes(("a",))

            async def served() -> dict[str, Any] | None:
                answer = await call(client, "create_session", {"resource": "bash"})
                assert answer["code"] in (0, 5002), answer
                return answer if answer["code"] == 0 else None

            again = await eventually(served, 90, every=1.0, what="the front end to serve the restarted cluster")
            lost = await call(client, "bash_run", {"command": "true", "session_id": handle})
            assert lost["code"] == 1003, lost
            fresh = await call(client, "bash_run", {"command": "echo up", "session_id": again["data"]["session_id"]})
            assert fresh["data"]["stdout"] == "up\n", fresh
            await call(client, "destroy_session", {"session_id": again["data"]["session_id"]})


async def test_a_front_end_started_while_the_cluster_is_down_answers_5002_then_recovers(
    cluster: RayCluster, tmp_path: Path
) -> None:
    """No Ray at the address yet: calls answer 5002 (retry); once the cluster is up the same front end serves."""
    front_end = cluster.start_front_end(tmp_path, cluster.manifest(tmp_path))
    with anyio.fail_after(300):
        async with stateless_client(front_end) as client:
            down = await call(client, "create_session", {"resource": "bash"})
            assert down["code"] == 5002, down
            assert "retry" in down["message"], down
            cluster.start_nodes(("a",))

            async def served() -> dict[str, Any] | None:
                answer = await call(client, "bash_run", {"command": "echo up"})
                assert answer["code"] in (0, 5002), answer
                return answer if answer["code"] == 0 else None

            up = await eventually(served, 120, every=1.0, what="the front end to reach the cluster once it is up")
            assert up["data"]["stdout"] == "up\n"


def creates_once_served(front_end: Any, client: Any) -> Callable[[], Awaitable[Any]]:
    """A poll for `eventually`: a bash create's answer once the front end serves (None while it answers
    5002); the front end process must stay alive throughout."""

    async def served() -> dict[str, Any] | None:
        assert front_end.process.poll() is None, front_end.log()
        answer = await call(client, "create_session", {"resource": "bash"})
        assert answer["code"] in (0, 5002), answer
        return answer if answer["code"] == 0 else None

    return served


@pytest.mark.timeout(400)
async def test_a_head_restarted_at_once_is_rejoined_by_a_front_end_that_survives(
    cluster: RayCluster, tmp_path: Path
) -> None:
    """The head SIGKILLed and started again at once, three times: a driver kept across the restart would be
    aborted by Ray (its GCS client reaches another cluster); the front end leaves at the GCS's first refusal
    (or at a changed cluster id), lives on, serves the new cluster, and old handles answer 1003."""
    cluster.start_nodes(("a",))
    front_end = cluster.start_front_end(tmp_path, cluster.manifest(tmp_path))
    with anyio.fail_after(360):
        async with stateless_client(front_end) as client:
            served = creates_once_served(front_end, client)

            handle = (await served() or {"data": {}})["data"].get("session_id")
            assert handle, "the front end did not serve its cluster"
            for restart in range(3):
                cluster.stop_node("a")
                cluster.start_nodes(("a",))
                again = await eventually(served, 90, every=0.5, what=f"the front end to serve after restart {restart}")
                assert front_end.process.poll() is None, front_end.log()
                lost = await call(client, "bash_run", {"command": "true", "session_id": handle})
                assert lost["code"] == 1003, lost
                handle = again["data"]["session_id"]
                ran = await call(client, "bash_run", {"command": "echo up", "session_id": handle})
                assert ran["data"]["stdout"] == "up\n", ran
            await call(client, "destroy_session", {"session_id": handle})
    assert front_end.process.poll() is None, front_end.log()


@pytest.mark.timeout(400)
async def test_a_head_restarted_while_the_front_end_could_not_look_is_told_by_its_cluster_id(
    cluster: RayCluster, tmp_path: Path
) -> None:
    """The front end SIGSTOPped while the head is killed and started again (a restart between two of its
    probes, made certain), twice: when it runs again the GCS port answers, so only the changed cluster id
    tells; the front end leaves before Ray's own clients reach the new cluster, lives on, and serves it."""
    cluster.start_nodes(("a",))
    front_end = cluster.start_front_end(tmp_path, cluster.manifest(tmp_path))
    with anyio.fail_after(360):
        async with stateless_client(front_end) as client:
            served = creates_once_served(front_end, client)

            handle = (await eventually(served, 60, every=0.5, what="the front end to serve"))["data"]["session_id"]
            for restart in range(2):
                front_end.process.send_signal(signal.SIGSTOP)
                try:
                    cluster.stop_node("a")
                    cluster.start_nodes(("a",))
                finally:
                    front_end.process.send_signal(signal.SIGCONT)
                again = await eventually(served, 90, every=0.5, what=f"the front end to serve after restart {restart}")
                lost = await call(client, "bash_run", {"command": "true", "session_id": handle})
                assert lost["code"] == 1003, lost
                handle = again["data"]["session_id"]
            await call(client, "destroy_session", {"session_id": handle})
    assert front_end.process.poll() is None, front_end.log()
    told = front_end.log_path.read_text(errors="replace").count("belongs to another cluster now")
    assert told == 2, front_end.log()
