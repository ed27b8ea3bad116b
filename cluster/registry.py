"""The cluster-wide registry: where each session lives, and which front ends are alive.

One named, detached actor per deployment (on the head node, so it lives as long as the
cluster). It holds digests only (`cluster.keys.digest`): handle -> host, (worker,
resource) -> host of that worker's default session, host -> its node and session count,
and the front ends' leases. Hosts write their own entries; front ends read them.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from dataclasses import dataclass

#: How long a replacement registry answers misses with "retry" (hosts report every second).
REBUILD_WINDOW = 5.0


def _hosts_running(deployment: str | None) -> bool:
    """True when `deployment` already has session hosts (asked only inside a Ray actor)."""
    import ray  # here: the registry's logic is plain Python (and tested without Ray)

    if deployment is None or not ray.is_initialized():
        return False
    try:
        named = ray.util.list_named_actors(all_namespaces=True)
    except ray.exceptions.RayError:
        return False
    return any(a["namespace"] == deployment and a["name"].startswith("host-") for a in named)


@dataclass
class HostInfo:
    resource: str
    node_id: str
    sessions: int = 0


@dataclass(frozen=True)
class Location:
    host: str
    node_id: str
    resource: str


class Registry:
    """Plain Python; `cluster.placement` runs it as a Ray actor (its methods run one at a time)."""

    def __init__(self, deployment: str | None = None) -> None:
        #: Changes when the registry is started afresh (its actor was lost): hosts then tell it everything again.
        self.epoch = secrets.token_hex(8)
        # A registry started while hosts run replaces a lost one: until the hosts have told it their
        # sessions (their next tick), a miss is "retry", not "unknown".
        self.rebuilding_until = time.monotonic() + REBUILD_WINDOW if _hosts_running(deployment) else 0.0
        self.sessions: dict[str, Location] = {}
        # Who each session counts against (principal, worker digest), fixed at its creation as
        # the engine's own budget does: the caps per principal and per worker span the cluster.
        self.owners: dict[str, tuple[str | None, str | None]] = {}
        self.by_principal: Counter[str] = Counter()
        self.by_worker: Counter[str] = Counter()
        self.defaults: dict[tuple[str, str], str] = {}
        self.hosts: dict[str, HostInfo] = {}
        self.leases: dict[str, float] = {}
        self.lapsed: dict[str, float] = {}

    # -- where sessions live ----------------------------------------------------------

    def register_host(self, host: str, resource: str, node_id: str) -> None:
        self.hosts.setdefault(host, HostInfo(resource, node_id))

    def sync(
        self,
        host: str,
        added: list[tuple[str, str | None, str | None]],
        removed: list[str],
        defaults_added: list[tuple[str, str]],
        defaults_removed: list[tuple[str, str]],
        live: int,
    ) -> None:
        """A host's changes since its last sync; `live` is its session count now.

        `added` holds (handle digest, principal, worker digest) of each new session."""
        info = self.hosts.get(host)
        if info is None:
            return  # dropped (its node was declared lost): late news from it must not resurrect it
        info.sessions = live
        where = Location(host, info.node_id, info.resource)
        for key, principal, worker in added:
            self.sessions[key] = where
            self._count(key, (principal, worker))
        for key in removed:
            if self.sessions.get(key) == where:
                del self.sessions[key]
                self._count(key, None)
        for pair in defaults_added:
            self.defaults[pair] = host
        for pair in defaults_removed:
            # Only the host that holds the default may remove it: a late removal from a host
            # whose default expired must not erase the one another host has since created.
            if self.defaults.get(pair) == host:
                del self.defaults[pair]

    def _count(self, key: str, owner: tuple[str | None, str | None] | None) -> None:
        """Start (owner given) or stop counting session `key` against its principal and worker."""
        principal, worker = self.owners.pop(key, (None, None))
        if principal is not None:
            self.by_principal[principal] -= 1
        if worker is not None:
            self.by_worker[worker] -= 1
        if owner is None:
            return
        self.owners[key] = owner
        principal, worker = owner
        if principal is not None:
            self.by_principal[principal] += 1
        if worker is not None:
            self.by_worker[worker] += 1

    def admit(
        self, principal: str, worker: str | None, count: int, per_principal: int | None, per_worker: int | None
    ) -> str | None:
        """Which cluster-wide cap `count` more sessions would pass ("principal", "worker"), if any."""
        if per_principal is not None and self.by_principal[principal] + count > per_principal:
            return "principal"
        if worker is not None and per_worker is not None and self.by_worker[worker] + count > per_worker:
            return "worker"
        return None

    def lookup(self, key: str) -> Location | bool | None:
        """Where session `key` lives; None if nowhere; True while a miss may only mean "not told yet"."""
        found = self.sessions.get(key)
        if found is None and time.monotonic() < self.rebuilding_until:
            return True
        return found

    def default(self, worker: str, resource: str) -> Location | None:
        host = self.defaults.get((worker, resource))
        info = self.hosts.get(host) if host is not None else None
        return Location(host, info.node_id, info.resource) if host is not None and info is not None else None

    def defaults_of(self, worker: str) -> dict[str, str]:
        return {resource: host for (w, resource), host in self.defaults.items() if w == worker}

    def all_hosts(self) -> dict[str, HostInfo]:
        return dict(self.hosts)

    def place(self, candidates: list[str], reserve: bool) -> str:
        """The candidate host with the fewest sessions; with `reserve` counted at once (until the
        host's next sync says the true number), so a burst of creates spreads."""
        chosen = min(candidates, key=lambda h: (self.hosts[h].sessions if h in self.hosts else 0, h))
        if reserve and chosen in self.hosts:
            self.hosts[chosen].sessions += 1
        return chosen

    def drop_host(self, host: str) -> int:
        """Forget a host whose actor or node is gone, and every session it held; returns how many."""
        self.hosts.pop(host, None)
        lost = [key for key, where in self.sessions.items() if where.host == host]
        for key in lost:
            del self.sessions[key]
            self._count(key, None)
        for pair in [pair for pair, h in self.defaults.items() if h == host]:
            del self.defaults[pair]
        return len(lost)

    # -- front-end leases --------------------------------------------------------------

    def heartbeat(self, front_end: str, ttl: float) -> None:
        self.leases[front_end] = time.monotonic() + ttl
        self.lapsed.pop(front_end, None)

    def release(self, front_end: str) -> None:
        """A front end that stops cleanly: its connections' sessions enter the grace at once."""
        self.leases.pop(front_end, None)
        self.lapsed[front_end] = time.monotonic()

    def lapsed_front_ends(self) -> list[str]:
        """Front ends whose lease ran out (kept for an hour, so every host hears of them)."""
        now = time.monotonic()
        for front_end, until in list(self.leases.items()):
            if until < now:
                del self.leases[front_end]
                self.lapsed[front_end] = now
        for front_end, since in list(self.lapsed.items()):
            if since < now - 3600:
                del self.lapsed[front_end]
        return list(self.lapsed)

    def host_tick(self) -> tuple[str, list[str], int]:
        """A host's periodic look: this registry's epoch, the lapsed front ends, how many are alive."""
        return self.epoch, self.lapsed_front_ends(), self.live_front_ends()

    def live_front_ends(self) -> int:
        now = time.monotonic()
        return sum(1 for until in self.leases.values() if until >= now)
