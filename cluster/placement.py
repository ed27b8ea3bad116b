"""Joining the cluster, finding eligible nodes, and getting (or starting) session hosts.

A node is eligible for resource NAME iff it is alive and advertises the custom resource
`agentflow.NAME` (and, when the manifest pins NAME to node labels, one of
`agentflow.node.LABEL`). Each (node, resource) has one detached, named host actor
(resources that link to each other share one: `cluster.keys.link_groups`), started on
first use by whichever front end needs it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import ray
from ray.core.generated import gcs_pb2
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.faults import CLUSTER_UNREACHABLE
from cluster.host import SessionHost
from cluster.keys import REGISTRY_NAME, host_name, node_label, node_resource
from cluster.registry import Registry
from manifests.schema import Manifest
from session.errors import ServiceUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long the list of live nodes is trusted before asking Ray again.
NODES_TTL = 2.0
#: A host with no sessions, no workers and no live front end exits after this long.
HOST_IDLE_EXIT = 60.0
#: How long a new host may take to start its engine (a node that died meanwhile never starts it).
HOST_START_TIMEOUT = 60.0
#: How long one request to Ray's control plane (GCS) may take before the call answers 5002.
GCS_TIMEOUT = 10.0
#: Concurrent calls one host accepts (each is a coroutine in its event loop).
HOST_CONCURRENCY = 10_000

_HostActor = ray.remote(SessionHost)
_RegistryActor = ray.remote(Registry)


@dataclass(frozen=True)
class Host:
    name: str
    node_id: str
    resource: str
    actor: Any


@dataclass(frozen=True)
class Node:
    node_id: str
    alive: bool
    resources: dict[str, float]


@dataclass
class _Reading:
    """A read of the node list under way, which calls arriving meanwhile wait for."""

    done: anyio.Event
    error: Exception | None = None


def ray_environment() -> None:
    """Process-wide Ray settings a front end needs before joining (kept if already set)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def connect(address: str, deployment: str) -> None:
    """Join the cluster as a driver in the deployment's namespace (blocking: ~2 s)."""
    ray_environment()
    if ray.is_initialized():
        return
    ray.init(
        address=address,
        namespace=deployment,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        configure_logging=False,
    )


def _node_table() -> list[Node]:
    """Every node the GCS knows. Not `ray.nodes()`: its request retries for ever, and when the head
    restarts meanwhile Ray aborts the process (the reply comes from another cluster); this one
    gives up after GCS_TIMEOUT."""
    client: Any = getattr(ray._private.worker.global_worker, "gcs_client")  # noqa: B009 (set by ray.init)
    table = client.get_all_node_info(timeout=GCS_TIMEOUT)
    alive: int = getattr(gcs_pb2, "GcsNodeInfo").ALIVE  # noqa: B009 (generated; no stubs)
    return [Node(info.node_id.hex(), info.state == alive, dict(info.resources_total)) for info in table.values()]


async def gcs(fn: Callable[[], T]) -> T:
    """Run one blocking request to Ray's control plane in a thread, bounded: when the GCS is away
    Ray retries for ever, so the caller is answered 5002 and the thread is left to finish."""
    try:
        with anyio.fail_after(GCS_TIMEOUT):
            return await anyio.to_thread.run_sync(fn, abandon_on_cancel=True)
    except TimeoutError:
        raise ServiceUnavailable(f"{CLUSTER_UNREACHABLE} (no answer in {GCS_TIMEOUT:g} s)") from None


class Placement:
    """One front end's view of the cluster: nodes, host actors, the registry actor."""

    def __init__(
        self, manifest: Manifest, deployment: str, groups: dict[str, str], idle_exit: float = HOST_IDLE_EXIT
    ) -> None:
        self.manifest = manifest
        self.deployment = deployment
        self.groups = groups
        self.idle_exit = idle_exit
        self.hosts: dict[str, Host] = {}
        self._nodes: list[Node] = []
        self._nodes_at = -NODES_TTL
        self._reading: _Reading | None = None
        self.registry: Any = None

    def join_registry(self) -> None:
        """Get the deployment's registry actor, starting it on the head node if it is not running."""
        self.registry = _RegistryActor.options(
            name=REGISTRY_NAME,
            namespace=self.deployment,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            resources={"node:__internal_head__": 0.001},
            max_restarts=0,
        ).remote(self.deployment)

    def reset(self) -> None:
        """Forget everything learned from the cluster (it was joined afresh)."""
        self.hosts.clear()
        self._nodes = []
        self._nodes_at = -NODES_TTL
        self.registry = None

    async def nodes(self, *, fresh: bool = False) -> list[Node]:
        if fresh:
            return await self._read_nodes()
        while time.monotonic() - self._nodes_at > NODES_TTL:
            reading = self._reading
            if reading is None:
                return await self._read_nodes()
            # A burst of calls found the list stale at once: one read of the GCS serves them all.
            await reading.done.wait()
            if reading.error is not None:
                raise reading.error
        return self._nodes

    async def _read_nodes(self) -> list[Node]:
        reading = self._reading = _Reading(anyio.Event())
        try:
            self._nodes = await gcs(_node_table)
            self._nodes_at = time.monotonic()
            return self._nodes
        except Exception as exc:
            reading.error = exc
            raise
        finally:
            if self._reading is reading:
                self._reading = None
            reading.done.set()  # a read cancelled with its caller leaves the list stale: a waiter reads again

    async def node_alive(self, node_id: str) -> bool:
        return any(n.node_id == node_id and n.alive for n in await self.nodes(fresh=True))

    async def eligible(self, resource: str) -> list[str]:
        """Live nodes that may run `resource` sessions."""
        spec = self.manifest.resources.get(resource)
        labels = [node_label(label) for label in (spec.nodes or [])] if spec is not None else []
        needed = node_resource(resource)
        return [
            n.node_id
            for n in await self.nodes()
            if n.alive and needed in n.resources and (not labels or any(label in n.resources for label in labels))
        ]

    async def host(self, resource: str, node_id: str) -> Host:
        """The host of `resource` (its group's) on `node_id`, started if it is not running."""
        group = self.groups.get(resource, resource)
        name = host_name(group, node_id)
        known = self.hosts.get(name)
        if known is not None:
            return known
        # Looking up (or registering) a named actor asks the GCS: off the event loop, bounded.
        actor: Any = await gcs(
            lambda: _HostActor.options(
                name=name,
                namespace=self.deployment,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                resources={node_resource(resource): 0.001},
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                max_restarts=0,
                max_concurrency=HOST_CONCURRENCY,
            ).remote(self.manifest, group, node_id, name, self.deployment, self.idle_exit)
        )
        actor.serve.remote()  # runs for the host's life; a no-op on a host already serving
        # Bounded: a node that died since the node list was read never schedules it.
        with anyio.fail_after(HOST_START_TIMEOUT):
            await actor.ready.remote()
        host = self.hosts[name] = Host(name, node_id, group, actor)
        return host

    async def known_host(self, name: str, node_id: str, resource: str) -> Host | None:
        """A running host the registry named (perhaps started by another front end); None if it is gone."""
        known = self.hosts.get(name)
        if known is not None:
            return known
        try:
            actor = await gcs(lambda: ray.get_actor(name, namespace=self.deployment))
        except ValueError:
            return None
        host = self.hosts[name] = Host(name, node_id, resource, actor)
        return host

    def forget(self, name: str) -> None:
        self.hosts.pop(name, None)
