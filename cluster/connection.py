"""A front end's link to the Ray cluster: joins in the background and rejoins after an outage.

A front end serves whether or not its cluster is up: while it is not, every call answers 5002
at once. The GCS's port is probed over TCP (no Ray thread involved, so a probe never hangs nor
outlives an outage); when it has refused connections for `DOWN_AFTER` seconds the driver is
shut down, and once the port answers again the front end joins afresh, with backoff. A driver
cannot simply be kept across a restart: a restarted head is a new cluster (new cluster id,
none of the old actors), and Ray's own GCS clients abort the process when a request they
retry reaches a different cluster.

Joining again invalidates everything learned from the old cluster: `on_join` is called after
each join (the front end drops its routing caches and re-attaches to the registry).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable

import anyio
import ray

from cluster.placement import connect
from session.errors import ServiceUnavailable

log = logging.getLogger(__name__)

#: How long the GCS port must refuse connections before the driver is given up. Short: a head
#: restarted within it would leave this driver talking to a new cluster, which Ray does not survive.
DOWN_AFTER = 2.0
#: How often the GCS port is probed while joined (a loopback or LAN TCP connect: cheap).
PROBE_EVERY = 0.5
#: A probe's own bound (a port that neither accepts nor refuses).
PROBE_TIMEOUT = 2.0
#: How long one join (`ray.init`) may take before it counts as failed.
JOIN_TIMEOUT = 60.0
#: Backoff between join attempts.
RETRY_FIRST, RETRY_MAX = 0.5, 5.0
#: Ray kills a driver whose GCS has been away this long (its default is 60 s); a front end rides
#: out any outage itself, so it sets this far out.
GCS_RECONNECT_TIMEOUT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"
GCS_RECONNECT_TIMEOUT = "86400"


def gcs_endpoint(address: str) -> tuple[str, int] | None:
    """`host:port` of a plain GCS address; None for forms that cannot be probed (e.g. 'auto')."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or "/" in host:
        return None
    return host.strip("[]"), int(port)


class RayConnection:
    """Run `run` in a task group; `check` before using Ray; `joined` is set while usable."""

    def __init__(self, address: str, deployment: str, on_join: Callable[[], Awaitable[None]]) -> None:
        os.environ.setdefault(GCS_RECONNECT_TIMEOUT_ENV, GCS_RECONNECT_TIMEOUT)
        self.address = address
        self.deployment = deployment
        self.on_join = on_join
        self.connected = False
        #: Incremented at every join: a cached Ray handle is only good in the generation it came from.
        self.generation = 0
        self.first_attempt = anyio.Event()
        self._calls: set[anyio.CancelScope] = set()
        self._endpoint = gcs_endpoint(address)

    def unreachable(self) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"the Ray cluster at {self.address} is unreachable; retrying (retry in a few seconds)"
        )

    def check(self) -> None:
        """Raises: ServiceUnavailable (5002) while the cluster is not joined."""
        if not self.connected:
            raise self.unreachable()

    def track(self, scope: anyio.CancelScope) -> None:
        """A call using Ray: cancelled if the cluster is given up meanwhile (its replies will never come)."""
        self._calls.add(scope)

    def untrack(self, scope: anyio.CancelScope) -> None:
        self._calls.discard(scope)

    async def run(self) -> None:
        """Join, watch, give up and rejoin, for ever."""
        delay = RETRY_FIRST
        while True:
            try:
                await self._join()
            except Exception as exc:  # any failure to join is retried; Ray raises many kinds
                # Once per outage at warning level: the retries would flood the log.
                level = logging.WARNING if delay == RETRY_FIRST else logging.DEBUG
                log.log(level, "cannot join the Ray cluster at %s (%s); retrying", self.address, exc)
                self.first_attempt.set()
                await anyio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_FIRST
            self.first_attempt.set()
            await self._watch()
            await self._leave()

    async def _join(self) -> None:
        if not await self._reachable():
            raise ConnectionError("its GCS port refuses connections")
        # ray.init retries an unreachable address for a long time: bounded, and off the event loop.
        with anyio.fail_after(JOIN_TIMEOUT):
            await anyio.to_thread.run_sync(connect, self.address, self.deployment, abandon_on_cancel=True)
        self.generation += 1
        try:
            await self.on_join()
        except Exception:
            # Not kept: a driver of a cluster that went away meanwhile would be reused by the next join.
            await self._shutdown_driver()
            raise
        self.connected = True
        log.info("joined the Ray cluster at %s (generation %d)", self.address, self.generation)

    async def _watch(self) -> None:
        """Return once the GCS has refused connections for DOWN_AFTER seconds."""
        down_since: float | None = None
        while True:
            await anyio.sleep(PROBE_EVERY)
            if await self._reachable():
                down_since = None
                continue
            now = anyio.current_time()
            down_since = now if down_since is None else down_since
            if now - down_since >= DOWN_AFTER:
                return

    async def _leave(self) -> None:
        self.connected = False
        log.warning("the Ray cluster at %s is unreachable: leaving it, and joining again when it returns", self.address)
        for scope in list(self._calls):
            scope.cancel()
        await self._shutdown_driver()

    async def _shutdown_driver(self) -> None:
        # ~5 s when the GCS is gone (Ray's own timeouts); bounded in case it is slower.
        with anyio.move_on_after(30):
            await anyio.to_thread.run_sync(ray.shutdown, abandon_on_cancel=True)

    async def _reachable(self) -> bool:
        if self._endpoint is None:
            return True  # nothing to probe: ray.init and Ray's errors tell
        host, port = self._endpoint
        try:
            with anyio.fail_after(PROBE_TIMEOUT):
                stream = await anyio.connect_tcp(host, port)
        except (OSError, TimeoutError):
            return False
        await stream.aclose()
        return True
