"""The multi-node harness itself: two real Ray nodes on loopback in a private namespace, torn down leaving nothing.

These hold without the ray executor; tests/cluster/test_cluster.py uses the same cluster for it.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import psutil
import pytest

from tests.support.netns import PrivateNetwork, namespace_id
from tests.support.ray_multinode import HEAD_PORT, REPO_ROOT, RayCluster, wait_no_leftovers

pytestmark = pytest.mark.slow


def listening(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP listener of `pids` (read in the caller's namespace)."""
    found: set[tuple[str, int]] = set()
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.Error:
            continue
        found.update((c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN)
    return found


def test_two_nodes_each_with_its_resources_on_loopback_only(ray_cluster: RayCluster) -> None:
    """Both nodes alive with distinct ids and their own custom resources; every Ray listener is on loopback."""
    nodes = {info["node_id"]: info for info in ray_cluster.query("nodes") if info["alive"]}
    a, b = ray_cluster.nodes["a"], ray_cluster.nodes["b"]
    assert {a.node_id, b.node_id} <= set(nodes)
    assert a.node_id != b.node_id
    assert "agentflow.vm" not in nodes[a.node_id]["resources"]
    assert nodes[b.node_id]["resources"]["agentflow.vm"] == 1000
    assert a.raylet_pid() is not None
    assert b.raylet_pid() is not None
    listeners = listening(ray_cluster.network.processes())
    assert ("127.0.0.1", HEAD_PORT) in {(ip.removeprefix("::ffff:"), port) for ip, port in listeners}
    assert {ip.removeprefix("::ffff:") for ip, _ in listeners} <= {"127.0.0.1"}, listeners


def test_ray_ports_exist_only_inside_the_private_namespace(ray_cluster: RayCluster) -> None:
    """The test thread reaches the GCS inside; from the machine's own namespace that listener does not exist."""
    with socket.create_connection(("127.0.0.1", HEAD_PORT), timeout=10):
        pass
    inside = namespace_id()
    with ray_cluster.network.outside():
        assert namespace_id() != inside
        gcs = ray_cluster.nodes["a"].processes()
        # No process of the cluster is in the machine's namespace: its sockets cannot be there either.
        assert all(namespace_id(p.pid) in ("", inside) for p in gcs)


def test_a_cluster_stopped_leaves_nothing(private_network: PrivateNetwork) -> None:
    """A second cluster (in its own namespace) up, a node SIGKILLed, then torn down: no process, no temp dir."""
    with PrivateNetwork() as network:
        cluster = RayCluster.start(network, labels=("a",))
        try:
            assert cluster.network.processes()
            assert cluster.root.exists()
        finally:
            cluster.stop()
        wait_no_leftovers(cluster)
        assert not cluster.root.exists()
    assert namespace_id() == private_network.id  # back where the module's fixture put the thread


def test_ray_refuses_a_driver_without_the_cluster_token(ray_cluster: RayCluster) -> None:
    """The cluster runs with Ray's token authentication: a driver without the token is not let in."""
    env = {k: v for k, v in ray_cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    env["RAY_AUTH_TOKEN"] = "0" * 64
    # Ray retries a refused driver's GCS connection for ~20 s by default; a few tries show the refusal.
    env["RAY_gcs_server_port_wait_time_s"] = "2"
    refused = subprocess.run(
        [sys.executable, "-m", "tests.support.ray_query", ray_cluster.address, "nodes"],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT, check=False,
    )  # fmt: skip
    assert refused.returncode != 0, refused.stdout
    assert "auth" in refused.stderr.lower() or "token" in refused.stderr.lower(), refused.stderr[-2000:]
