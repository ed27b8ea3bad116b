"""A real two-node Ray cluster on this machine, and `serve --executor ray` front ends in front of it.

Layout (all inside one `PrivateNetwork`, see tests/support/netns.py for why and how):

- node `a`: `ray start --head`, custom resources {"agentflow.bash": 1000, "agentflow.browser": 1000,
  "agentflow.node.a": 1} (so `browser` sessions can only go to `a`);
- node `b`: `ray start --address <head>`, {"agentflow.bash": 1000, "agentflow.vm": 1000,
  "agentflow.node.b": 1} (so `vm` sessions can only go to `b`);
- each node with its own `--temp-dir` (short: Ray's unix sockets live under it and a socket path
  is limited to 107 bytes) and its own fixed ports: the namespace is private, so fixed ports
  cannot collide with anything else on the machine;
- Ray's environment: Ray's token authentication on (RAY_AUTH_MODE=token, a token per cluster),
  RAY_USAGE_STATS_ENABLED=0, RAY_prestart_worker_first_driver=0 (spares the 2
  cores), HOME under the cluster's scratch directory, `--include-dashboard false`, `--num-cpus 1`,
  and this test run's AGENTFLOW_RUN_ID, so the sessions the nodes' actors start are this run's
  for tests/support/leaks.py.

Teardown never uses `ray stop`: it kills every Ray process on the machine, other runs' included.
Each `ray start` runs in a new session, so its daemons (GCS, raylet, agents, workers) share one
process group that is killed by id; then whatever is still in the private namespace (the namespace
is ours alone, so every process in it is ours) is killed and waited for, and the temp dirs are
removed. `leftovers()` is the leak check: processes in the namespace, this run's session processes,
temp dirs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.support import leaks, procs
from tests.support.manifests import TEST_MARKER_ENV, write_manifest
from tests.support.netns import PrivateNetwork
from tests.support.polling import eventually_sync
from tests.support.servers import ServerProcess, new_token, server_command, start_http_server

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
HEAD_PORT = 6379
#: Actors of the deployment live in this Ray namespace (the executor's default deployment name).
DEPLOYMENT = "agentflow"
RAY_START_TIMEOUT = 120.0
QUERY_TIMEOUT = 120.0

NODE_RESOURCES: dict[str, dict[str, float]] = {
    "a": {"agentflow.bash": 1000, "agentflow.browser": 1000, "agentflow.node.a": 1},
    "b": {"agentflow.bash": 1000, "agentflow.vm": 1000, "agentflow.node.b": 1},
}


def ray_binary() -> Path:
    """The `ray` CLI beside the interpreter running the tests (the venv's)."""
    return Path(sys.executable).with_name("ray")


def ray_missing() -> str | None:
    """None when Ray is installed in this environment, else why the cluster tests cannot run."""
    if not ray_binary().exists():
        return "Ray is not installed in this environment (scripts/test installs the [ray] extra)"
    return None


def executor_missing() -> str | None:
    """None when `agentflow-sandbox serve` has `--executor`, else the reason to skip executor tests."""
    out = subprocess.run(
        [*server_command(), "serve", "--help"], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    return None if "--executor" in out else "this tree's `agentflow-sandbox serve` has no --executor (ray executor)"


@dataclass(frozen=True)
class NodePorts:
    node_manager: int
    object_manager: int
    min_worker: int
    max_worker: int
    agent_listen: int
    agent_grpc: int
    runtime_env_agent: int
    metrics: int

    def args(self) -> list[str]:
        return [
            "--node-manager-port", str(self.node_manager),
            "--object-manager-port", str(self.object_manager),
            "--min-worker-port", str(self.min_worker),
            "--max-worker-port", str(self.max_worker),
            "--dashboard-agent-listen-port", str(self.agent_listen),
            "--dashboard-agent-grpc-port", str(self.agent_grpc),
            "--runtime-env-agent-port", str(self.runtime_env_agent),
            "--metrics-export-port", str(self.metrics),
        ]  # fmt: skip


def _ports(index: int) -> NodePorts:
    base = 6380 + 10 * index
    workers = 20000 + 1000 * index
    agents = 52300 + 10 * index
    return NodePorts(base, base + 1, workers, workers + 999, agents, agents + 1, agents + 2, agents + 3)


@dataclass
class RayNode:
    label: str
    head: bool
    temp_dir: Path
    ports: NodePorts
    resources: dict[str, float]
    pgid: int | None = None
    node_id: str = ""

    def processes(self) -> list[psutil.Process]:
        """Live processes of this node's process group."""
        if self.pgid is None:
            return []
        found = []
        for proc in psutil.process_iter(["pid", "name", "status"]):
            with contextlib.suppress(psutil.Error, OSError):
                if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == self.pgid:
                    found.append(proc)
        return found

    def raylet_pid(self) -> int | None:
        return next((p.pid for p in self.processes() if p.info["name"] == "raylet"), None)

    def ray_ports(self) -> list[int]:
        """Ports the node's Ray daemons listen on (the GCS's too on the head)."""
        ports = [self.ports.node_manager, self.ports.object_manager]
        return [HEAD_PORT, *ports] if self.head else ports


@dataclass
class RayCluster:
    """See the module docstring. Build with `RayCluster.start()`; `stop()` tears everything down."""

    network: PrivateNetwork
    root: Path
    nodes: dict[str, RayNode] = field(default_factory=dict)
    front_ends: list[ServerProcess] = field(default_factory=list)
    token: str = field(default_factory=new_token, repr=False)
    run_marker: str = field(default_factory=leaks.new_test_marker)
    ray_token: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{HEAD_PORT}"

    @property
    def env(self) -> dict[str, str]:
        """Environment of every Ray process and front end of this cluster.

        No RAY_* variable of this process passes: the engine tests' single-node cluster puts its
        own (token, loopback only) into this process's environment while it is joined.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            # Ray's own token authentication, as a deployment should run it (every node, driver and
            # front end of the cluster shares the token).
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.ray_token,
            RAY_USAGE_STATS_ENABLED="0",
            RAY_prestart_worker_first_driver="0",
            HOME=str(self.root / "home"),
            AGENTFLOW_RAY_CLUSTER=self.root.name,
        )
        env[leaks.RUN_ID_ENV] = leaks.run_id()
        return env

    # -- nodes ----------------------------------------------------------------------------

    @classmethod
    def create(cls, network: PrivateNetwork) -> RayCluster:
        """A cluster with no node yet (its scratch directory only)."""
        root = Path(tempfile.mkdtemp(prefix="afray-", dir="/tmp"))  # short: unix socket paths
        (root / "home").mkdir()
        return cls(network, root)

    @classmethod
    def start(cls, network: PrivateNetwork, labels: tuple[str, ...] = ("a", "b")) -> RayCluster:
        """Start the head (`labels[0]`) and the other nodes; the calling thread must be in `network`."""
        cluster = cls.create(network)
        try:
            cluster.start_nodes(labels)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def start_nodes(self, labels: tuple[str, ...] = ("a", "b")) -> None:
        """The head (`labels[0]`), then the others; returns once the GCS reports all of them alive."""
        for index, label in enumerate(labels):
            self.start_node(label, head=index == 0)
        self.wait_nodes_alive(set(labels))

    def start_node(self, label: str, *, head: bool = False) -> RayNode:
        index = ord(label) - ord("a")
        # A restarted node gets a fresh temp dir: `ray start --head` refuses to start when its temp dir
        # names a bootstrap address that any GCS on the machine serves (other runs' clusters, in their own
        # namespaces, use the same fixed port).
        temp_dir = self.root / label
        restarts = 0
        while temp_dir.exists():
            restarts += 1
            temp_dir = self.root / f"{label}{restarts}"
        node = RayNode(label, head, temp_dir, _ports(index), NODE_RESOURCES[label])
        argv = [str(ray_binary()), "start", "--head", "--port", str(HEAD_PORT)] if head else [
            str(ray_binary()), "start", "--address", self.address,
        ]  # fmt: skip
        argv += [
            "--temp-dir", str(node.temp_dir),
            "--num-cpus", "1",
            "--resources", json.dumps(node.resources),
            "--disable-usage-stats",
            *node.ports.args(),
        ]  # fmt: skip
        if head:
            argv += ["--include-dashboard", "false"]
        with (self.root / f"ray-start-{label}.log").open("wb") as out:
            # A new session: every daemon of this node shares the process group `ray start` leads.
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        node.pgid = process.pid
        self.nodes[label] = node
        try:
            rc = process.wait(RAY_START_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            rc = process.wait()
        if rc != 0:
            raise RuntimeError(f"ray start (node {label}) failed, rc={rc}:\n{self.start_log(label)}")
        return node

    def start_log(self, label: str) -> str:
        path = self.root / f"ray-start-{label}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def query(self, what: str) -> Any:
        """`nodes` or `actors` (tests/support/ray_query.py), from a child in the cluster's namespace."""
        result = subprocess.run(
            [sys.executable, "-m", "tests.support.ray_query", self.address, what],
            capture_output=True, text=True, timeout=QUERY_TIMEOUT, env=self.env, cwd=REPO_ROOT, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"ray query {what} failed (rc={result.returncode}):\n{result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    def wait_nodes_alive(self, labels: set[str], within: float = 90.0) -> None:
        """Poll the GCS until every node in `labels` is alive; note their node ids."""

        def alive() -> bool:
            for info in self.query("nodes"):
                for label in labels:
                    if info["alive"] and f"agentflow.node.{label}" in info["resources"]:
                        self.nodes[label].node_id = info["node_id"]
            return all(self.nodes[label].node_id for label in labels)

        eventually_sync(alive, within, every=0.5, what=f"Ray nodes {sorted(labels)} to be alive")

    def node_alive(self, label: str) -> bool:
        return any(info["alive"] and info["node_id"] == self.nodes[label].node_id for info in self.query("nodes"))

    def named_actors(self, namespace: str = DEPLOYMENT) -> list[str]:
        return sorted(a["name"] for a in self.query("actors") if a["namespace"] == namespace)

    def kill_raylet(self, label: str) -> int:
        """SIGKILL node `label`'s raylet (the node is lost: Ray declares it dead after ~12-15 s here)."""
        pid = self.nodes[label].raylet_pid()
        if pid is None:
            raise RuntimeError(f"node {label} has no raylet")
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop_node(self, label: str) -> None:
        """SIGKILL node `label`'s whole process group and wait until none of it is left."""
        node = self.nodes[label]
        if node.pgid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pgid, signal.SIGKILL)
        eventually_sync(lambda: not node.processes(), 30, what=f"node {label}'s processes to exit")

    # -- front ends ------------------------------------------------------------------------

    def manifest(self, directory: Path, *, disconnect_grace: float = 5.0, session_ttl: float = 300.0,
                 browser: bool = False, host_idle_exit: float | None = None) -> Path:  # fmt: skip
        """A front end manifest: bash in the default `sandbox` tier, shells tagged with the cluster's marker
        (and `browser`, with its defaults, when asked; `server.ray_host_idle_exit` when given)."""
        config = {"timeout": 20, "env": {TEST_MARKER_ENV: self.run_marker}}
        resources: dict[str, Any] = {"bash": {"enabled": True, "config": config, "policy": {"isolation": "sandbox"}}}
        if browser:
            resources["browser"] = {"enabled": True}
        return write_manifest(
            directory,
            session_ttl=session_ttl,
            disconnect_grace=disconnect_grace,
            resources=resources,
            name=f"frontend-{uuid.uuid4().hex[:8]}.json",
            server=None if host_idle_exit is None else {"ray_host_idle_exit": host_idle_exit},
        )

    def start_front_end(self, directory: Path, manifest: Path, *, address: str | None = None) -> ServerProcess:
        """`agentflow-sandbox serve --executor ray --ray-address ...` with the cluster's shared token."""
        server = start_http_server(
            directory,
            manifest=manifest,
            token=self.token,
            extra_args=("--executor", "ray", "--ray-address", address or self.address),
            base_env=self.env,
        )
        self.front_ends.append(server)
        return server

    # -- teardown and leak check -----------------------------------------------------------

    def stop_front_ends(self) -> None:
        for server in self.front_ends:
            with contextlib.suppress(Exception):
                server.stop(signal.SIGTERM, timeout=30)
        self.front_ends.clear()

    def stop(self) -> None:
        """Front ends, then every node's process group, then anything left in the namespace; temp dirs."""
        self.stop_front_ends()
        for label in reversed(list(self.nodes)):
            pgid = self.nodes[label].pgid
            if pgid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)

        def emptied() -> bool:
            left = self.network.processes()
            procs.kill(left)
            return not left

        eventually_sync(
            emptied, 30, what=lambda: f"processes in the cluster's namespace to exit: {self.network.processes()}"
        )
        shutil.rmtree(self.root, ignore_errors=True)

    def leftovers(self) -> dict[str, Any]:
        """What this cluster left: processes in its namespace, its sessions' processes, its temp dirs."""
        return {
            "namespace processes": self.network.processes(),
            "session processes": leaks.session_pids(test_marker=self.run_marker, with_descendants=True),
            "temp dir": [str(self.root)] if self.root.exists() else [],
        }


def wait_no_leftovers(cluster: RayCluster, within: float = 30.0) -> None:
    """Poll until `cluster.leftovers()` is empty everywhere; fail naming what is left."""
    eventually_sync(
        lambda: not any(cluster.leftovers().values()), within, what=lambda: f"no leftovers; left: {cluster.leftovers()}"
    )
