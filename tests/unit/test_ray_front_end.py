"""The ray executor's own behaviour: the CLI switch, front ends sharing sessions, placement, lost hosts.

The engine and bash suites run on both executors (the `executor` fixture); this module covers
what only the ray executor has. Tests marked slow use the run's single-node Ray cluster
(`ray_head`); two-node placement, node loss and SIGKILLed front ends are in the cluster tests.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from cluster.keys import connection_worker, front_end_of, link_groups
from cluster.registry import Registry
from manifests.schema import Manifest
from mcp_server.cli import cli_logic
from session.models import Caller
from tests.executors import FAKES, manifest_of
from tests.support.manifests import write_manifest
from tests.support.servers import new_token, running_http_server

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_the_local_executor_never_imports_ray():
    probe = (
        "import sys\n"
        "from manifests import load_manifest\n"
        "from mcp_server.app import build_server\n"
        "from mcp_server.factory import executor_from_manifest\n"
        "from mcp_server.transports import http_app\n"
        "engine = executor_from_manifest(load_manifest(None))\n"
        "http_app(engine, build_server(engine))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'cluster')))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_executor_ray_refuses_a_generated_token(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("AGENTFLOW_SANDBOX_TOKEN", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    manifest = write_manifest(tmp_path)
    argv = ["serve", "--manifest", str(manifest), "--transport", "http", "--port", "0"]
    assert cli_logic([*argv, "--executor", "ray", "--ray-address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "--executor ray needs configured tokens" in err
    assert "AGENTFLOW_SANDBOX_TOKEN" in err
    assert not list(tmp_path.rglob("token-*"))  # refused before any token file was written


def test_executor_ray_needs_an_address(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AGENTFLOW_SANDBOX_TOKEN", secrets.token_urlsafe(32))
    manifest = write_manifest(tmp_path)
    assert cli_logic(["serve", "--manifest", str(manifest), "--executor", "ray"]) == 2
    assert "--ray-address or server.ray_address" in capsys.readouterr().err


def test_the_manifest_names_the_executor_and_pins():
    manifest = Manifest.model_validate(
        {
            "server": {"executor": "ray", "ray_address": "10.0.0.5:6379", "deployment": "prod-1"},
            "resources": {"bash": {"nodes": ["cpu"]}},
        }
    )
    assert manifest.server.executor == "ray"
    assert manifest.resources["bash"].nodes == ["cpu"]
    with pytest.raises(ValueError, match="deployment"):
        Manifest.model_validate({"server": {"deployment": "no spaces"}})


def test_connection_workers_are_unique_per_front_end_and_meta_keys_are_not():
    assert connection_worker("fe1", "conn:abc") == "conn:fe1:abc"
    assert connection_worker("fe1", "conn:abc") != connection_worker("fe2", "conn:abc")
    assert connection_worker("fe1", "key:Zk3") == "key:Zk3"
    assert front_end_of("alice/conn:fe1:abc") == "fe1"
    assert front_end_of("alice/key:Zk3") is None


def test_linked_resources_share_a_host_group():
    groups = link_groups({"bash": set(), "vm": set(), "browser": {"vm"}, "lone": {"absent"}})
    assert groups == {"bash": "bash", "vm": "browser+vm", "browser": "browser+vm", "lone": "lone"}


def test_registry_keeps_digests_leases_and_only_the_holders_removals():
    registry = Registry()
    registry.register_host("h1", "bash", "n1")
    registry.register_host("h2", "bash", "n2")
    registry.sync("h1", [("d1", "alice", "w")], [], [("w", "bash")], [], 1)
    assert registry.admit("alice", "w", 1, per_principal=2, per_worker=1) == "worker"
    assert registry.admit("alice", "v", 1, per_principal=1, per_worker=None) == "principal"
    assert registry.admit("bob", "x", 1, per_principal=1, per_worker=1) is None
    assert registry.lookup("d1").host == "h1"
    # the default moved to h2; h1's late removal must not erase it
    registry.sync("h2", [], [], [("w", "bash")], [], 0)
    registry.sync("h1", [], ["d1"], [], [("w", "bash")], 0)
    assert registry.default("w", "bash").host == "h2"
    assert registry.lookup("d1") is None
    assert registry.admit("alice", "w", 1, per_principal=1, per_worker=1) is None  # released with the session
    assert registry.place(["h1", "h2"], True) == "h1"
    assert registry.place(["h1", "h2"], True) == "h2"  # the first placement counted at once
    registry.heartbeat("fe", 0.0)
    assert registry.lapsed_front_ends() == ["fe"]
    registry.heartbeat("fe", 60.0)
    assert registry.lapsed_front_ends() == []
    assert registry.live_front_ends() == 1
    assert registry.drop_host("h2") == 0
    assert registry.default("w", "bash") is None


# -- on the run's Ray cluster ------------------------------------------------------------

ALICE_A = Caller("alice", "conn:same-id")
ALICE_KEY = Caller("alice", "key:" + "k" * 24)
ALICE_STATELESS = Caller("alice", None)


@asynccontextmanager
async def front_ends(address: str, manifest: Manifest, count: int = 2) -> AsyncIterator[list]:
    """`count` front ends of one fresh deployment (each as a separate front end would be)."""
    from cluster.executor import RayExecutor

    deployment = f"test-{secrets.token_hex(4)}"
    manifest = manifest.model_copy(
        update={"server": manifest.server.model_copy(update={"executor": "ray", "deployment": deployment})}
    )
    async with AsyncExitStack() as stack:
        opened = [await stack.enter_async_context(RayExecutor(manifest, address=address)) for _ in range(count)]
        try:
            yield opened
        finally:
            await opened[0].stop_deployment()


@pytest.mark.slow
async def test_a_session_made_through_one_front_end_is_used_through_another(ray_head):
    async with front_ends(ray_head.address, manifest_of(FAKES)) as (a, b):
        made = (await a.call(ALICE_A, "create_session", {"resource": "fake"})).envelope
        handle = made.data["session_id"]
        await a.call(ALICE_A, "fake_set", {"key": "k", "value": 7})
        got = (await b.call(ALICE_STATELESS, "fake_get", {"key": "k", "session_id": handle})).envelope
        assert (got.code, got.data["value"], got.meta.session_id) == (0, 7, handle)
        # the same connection id on another front end is another connection: no default session there
        other = (await b.call(ALICE_A, "fake_get", {"key": "k"})).envelope
        assert other.meta.temporary_session
        # where it lives is in the listing
        [listed] = (await b.call(ALICE_STATELESS, "list_sessions", {"all": True})).envelope.data["sessions"]
        assert listed["details"]["host"] == f"host-fake-{listed['details']['node_id']}"
        assert len(listed["details"]["node_id"]) == 56  # a Ray node id in hex
        status = (await b.call(ALICE_STATELESS, "get_status", {})).envelope.data
        assert (status["executor"], status["live_sessions"]) == ("ray", 1)
        assert [h["resource"] for h in status["hosts"]] == ["fake"]


@pytest.mark.slow
async def test_a_meta_worker_key_names_one_worker_through_every_front_end(ray_head):
    async with front_ends(ray_head.address, manifest_of(FAKES)) as (a, b):
        assert (await a.call(ALICE_KEY, "create_session", {"resource": "fake"})).envelope.code == 0
        await a.call(ALICE_KEY, "fake_set", {"key": "k", "value": 1})
        through_b = (await b.call(ALICE_KEY, "fake_get", {"key": "k"})).envelope
        assert not through_b.meta.temporary_session
        assert through_b.data["value"] == 1
        assert len((await b.call(ALICE_KEY, "list_sessions", {})).envelope.data["sessions"]) == 1
        destroyed = (await b.call(ALICE_KEY, "destroy_session", {"resource": "fake"})).envelope
        assert len(destroyed.data["destroyed"]) == 1
        assert (await a.call(ALICE_KEY, "fake_get", {"key": "k"})).envelope.meta.temporary_session


@pytest.mark.slow
async def test_calls_that_find_the_node_list_stale_at_once_share_one_read(ray_head, monkeypatch):
    import anyio

    from cluster import placement
    from session.errors import ServiceUnavailable

    reads: list[bool] = []
    read_table = placement._node_table
    gcs_away = False

    def counted() -> list[placement.Node]:
        reads.append(gcs_away)
        if gcs_away:
            raise ServiceUnavailable("the GCS did not answer")
        return read_table()

    monkeypatch.setattr(placement, "_node_table", counted)
    async with front_ends(ray_head.address, manifest_of(FAKES), count=1) as (front,):
        answers: list[object] = []

        async def eligible() -> None:
            try:
                answers.append(await front.placement.eligible("fake"))
            except ServiceUnavailable as exc:
                answers.append(exc.code)

        for gcs_away in (False, True):
            front.placement._nodes_at = -placement.NODES_TTL  # stale, as after 2 s without a read
            reads.clear()
            answers.clear()
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(eligible)
            assert reads == [gcs_away]
            if gcs_away:
                assert answers == [5002] * 20  # the shared read's failure, at once, not one timeout each
            else:
                assert len(answers) == 20
                assert all(isinstance(a, list) and len(a) == 1 for a in answers)  # the run's one node
                assert len({tuple(a) for a in answers if isinstance(a, list)}) == 1


@pytest.mark.slow
async def test_a_front_end_that_stops_puts_its_connections_sessions_in_the_grace(ray_head):
    manifest = manifest_of(FAKES, disconnect_grace=30)
    async with front_ends(ray_head.address, manifest, count=1) as (survivor,):
        from cluster.executor import RayExecutor

        leaving = RayExecutor(
            manifest.model_copy(update={"server": survivor.placement.manifest.server}), address=ray_head.address
        )
        async with leaving:
            made = (await leaving.call(ALICE_A, "create_session", {"resource": "fake"})).envelope
            handle = made.data["session_id"]

        # its lease was released: the host starts the grace of the connection's sessions
        async def orphaned() -> bool:
            listed = (await survivor.call(ALICE_STATELESS, "list_sessions", {"all": True})).envelope
            return [s["orphaned"] for s in listed.data["sessions"]] == [True]

        from tests.support.polling import eventually

        await eventually(orphaned, 15, what="the session to enter the disconnect grace")
        adopted = await survivor.call(Caller("alice", "conn:new"), "fake_get", {"key": "k", "session_id": handle})
        assert adopted.envelope.code == 0


@pytest.mark.slow
async def test_a_lost_host_answers_1003_and_leaves_the_listing(ray_head):
    import ray

    async with front_ends(ray_head.address, manifest_of(FAKES), count=1) as (front,):
        handle = (await front.call(ALICE_STATELESS, "create_session", {"resource": "fake"})).envelope.data["session_id"]
        [host] = await front.hosts_of("fake")
        ray.kill(host.actor, no_restart=True)
        lost = (await front.call(ALICE_STATELESS, "fake_get", {"key": "k", "session_id": handle})).envelope
        assert lost.code == 1003
        assert "was lost" in lost.message
        assert (await front.call(ALICE_STATELESS, "list_sessions", {"all": True})).envelope.data["sessions"] == []
        # a new session gets a new host
        assert (await front.call(ALICE_STATELESS, "create_session", {"resource": "fake"})).envelope.code == 0


@pytest.mark.slow
async def test_a_resource_no_node_offers_is_2004_naming_the_custom_resource(ray_head):
    manifest = manifest_of({"fake": FAKES["fake"], "third": FAKES["fake"]})
    gpu_only = manifest.resources["fake"].model_copy(update={"nodes": ["gpu"]})
    pinned = manifest.model_copy(update={"resources": {**manifest.resources, "fake": gpu_only}})
    async with front_ends(ray_head.address, pinned, count=1) as (front,):
        third = (await front.call(ALICE_STATELESS, "create_session", {"resource": "third"})).envelope
        assert third.code == 2004
        assert "agentflow.third" in third.message
        fake = (await front.call(ALICE_STATELESS, "fake_get", {"key": "k"})).envelope
        assert fake.code == 2004
        assert "agentflow.node.gpu" in fake.message


@pytest.mark.slow
async def test_serve_executor_ray_two_front_ends_over_http(ray_head, tmp_path: Path):
    from sandbox import Sandbox

    token = new_token()
    manifest = write_manifest(tmp_path, server={"deployment": f"test-{secrets.token_hex(4)}"})
    args = ("--executor", "ray", "--ray-address", ray_head.address)
    with (
        running_http_server(tmp_path, manifest=manifest, token=token, extra_args=args) as a,
        running_http_server(tmp_path, manifest=manifest, token=token, extra_args=args) as b,
    ):
        worker = f"worker-{secrets.token_urlsafe(16)}"
        # (Both open at once: a connection's close ends its worker's sessions, on any executor.)
        async with (
            Sandbox(url=a.mcp_url, token=token, worker_id=worker) as through_a,
            Sandbox(url=b.mcp_url, token=token, worker_id=worker) as through_b,
        ):
            made = await through_a.create_session("bash")
            assert (await through_a.execute("bash:run", {"command": "cd /tmp; X=42"}))["code"] == 0
            # the same worker through the other front end: the same shell, state kept
            ran = await through_b.execute("bash:run", {"command": "echo $PWD $X"})
            assert ran["data"]["stdout"] == "/tmp 42\n"
            assert ran["meta"]["session_id"] == made["session_id"]
            [listed] = (await through_b.list_sessions())["sessions"]
            assert listed["details"]["host"].startswith("host-bash-")
            await through_b.destroy_session()
            assert (await through_a.list_sessions())["sessions"] == []


@pytest.mark.slow
async def test_progress_of_a_long_call_streams_back_through_the_front_end(ray_head):
    reports: list[tuple[float, str | None]] = []

    async def progress(done: float, total: float | None = None, message: str | None = None) -> None:
        reports.append((done, message))

    manifest = manifest_of({"bash": "backends.bash:BashBackend"}, policies={"bash": {"isolation": "none"}})
    async with front_ends(ray_head.address, manifest, count=1) as (front,):
        made = await front.call(
            ALICE_STATELESS, "create_session", {"resource": "bash", "config": {"progress_interval": 0.3}}
        )
        args = {"command": "sleep 1.5; echo done", "session_id": made.envelope.data["session_id"]}
        result = (await front.call(ALICE_STATELESS, "bash_run", args, progress=progress)).envelope
        assert result.data["stdout"] == "done\n"
    assert len(reports) >= 2
    assert all(message and "running for" in message for _, message in reports)


@pytest.mark.slow
async def test_a_lost_registry_is_rebuilt_from_the_hosts(ray_head):
    import ray

    from tests.support.polling import eventually

    async with front_ends(ray_head.address, manifest_of(FAKES)) as (a, b):
        made = await a.call(ALICE_STATELESS, "create_session", {"resource": "fake"})
        handle = made.envelope.data["session_id"]
        await a.call(ALICE_STATELESS, "fake_set", {"key": "k", "value": 5, "session_id": handle})
        ray.kill(a.placement.registry, no_restart=True)

        async def served_again() -> bool:
            # b never used the handle: it has to find it in the (new) registry
            got = (await b.call(ALICE_STATELESS, "fake_get", {"key": "k", "session_id": handle})).envelope
            assert got.code in (0, 5002), got.message  # "retry" while rebuilding, never "unknown"
            return got.code == 0 and got.data["value"] == 5

        await eventually(served_again, 30, every=0.2, what="the handle to work again")


def _deployment_of(manifest: Manifest) -> Manifest:
    server = manifest.server.model_copy(update={"executor": "ray", "deployment": f"test-{secrets.token_hex(4)}"})
    return manifest.model_copy(update={"server": server})


@pytest.mark.slow
async def test_a_front_end_whose_lease_lapses_puts_its_connections_sessions_in_the_grace(ray_head):
    from cluster.executor import RayExecutor
    from tests.support.polling import eventually

    manifest = _deployment_of(manifest_of(FAKES, disconnect_grace=30))
    async with RayExecutor(manifest, address=ray_head.address) as survivor:
        try:
            dying = RayExecutor(manifest, address=ray_head.address, lease_ttl=1.0)
            async with dying:
                made = (await dying.call(ALICE_A, "create_session", {"resource": "fake"})).envelope
                # As a SIGKILLed front end: its heartbeats stop and it never releases its lease.
                dying._stopped = True

            async def orphaned() -> bool:
                listed = (await survivor.call(ALICE_STATELESS, "list_sessions", {"all": True})).envelope
                return [s["orphaned"] for s in listed.data["sessions"]] == [True]

            await eventually(orphaned, 15, what="the lapsed front end's session to enter the grace")
            args = {"key": "k", "session_id": made.data["session_id"]}
            assert (await survivor.call(Caller("alice", "conn:other"), "fake_get", args)).envelope.code == 0
        finally:
            await survivor.stop_deployment()


@pytest.mark.slow
async def test_a_host_with_nothing_left_and_no_front_end_exits(ray_head):
    import ray

    from cluster.executor import RayExecutor
    from cluster.keys import REGISTRY_NAME
    from tests.support.polling import eventually

    manifest = _deployment_of(manifest_of(FAKES))
    deployment = manifest.server.deployment
    async with RayExecutor(manifest, address=ray_head.address, host_idle_exit=1.0) as front:
        made = (await front.call(ALICE_STATELESS, "create_session", {"resource": "fake"})).envelope
        await front.call(ALICE_STATELESS, "destroy_session", {"session_id": made.data["session_id"]})
        [host] = await front.hosts_of("fake")
    # the front end left (lease released) and the host holds nothing: it exits by itself

    def gone() -> bool:
        try:
            ray.get_actor(host.name, namespace=deployment)
        except ValueError:
            return True
        return False

    await eventually(gone, 30, what="the idle host to exit")
    ray.kill(ray.get_actor(REGISTRY_NAME, namespace=deployment), no_restart=True)
