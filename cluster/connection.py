"""A front end's link to the Ray cluster: joins in the background and rejoins after an outage.

A front end serves whether or not its cluster is up: while it is not, every call answers 5002
at once. The GCS's port is probed over TCP every PROBE_EVERY seconds (no Ray thread involved,
so a probe never hangs nor outlives an outage), then the id of the cluster answering there is
read through a fresh GCS client (`cluster.identity`; bounded, one at a time). The driver is given
up as soon as the GCS refuses connections (a GCS that refuses is a dead one) or the id differs
from the joined cluster's (the head was restarted between two probes, e.g. while this process
was stopped); once a GCS answers again the front end joins afresh, with backoff. A driver cannot
simply be kept across a restart: a restarted head is a new cluster (new cluster id, none of the
old actors), and Ray's own GCS clients abort the process when a request they retry reaches a
different cluster, or leave the driver stuck on the old one (seen here: every call 5002 for ever).

A cluster that refuses this front end's Ray token (or a front end with none) is not an outage:
calls answer 5001 with the cause and the fix, it is logged once at error level, and joining is
retried slowly (every REFUSED_RETRY_MAX seconds at most, each a ~2-4 ms GCS request instead of
`ray.init`'s 20 s of refused retries), so a fixed token file or a cluster restarted with this
front end's token is picked up without a restart.

Joining again invalidates everything learned from the old cluster: `on_join` is called after
each join (the front end drops its routing caches and re-attaches to the registry).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import ray

from cluster.identity import CredentialsRefused, cluster_id, local_token_problem
from cluster.placement import connect
from session.errors import ConfigurationError, SandboxError, ServiceUnavailable

log = logging.getLogger(__name__)

#: How long the GCS port may go unanswered (probes timing out: a slow or cut network) before the
#: driver is given up. A refused connection gives it up at once: a GCS that refuses has exited,
#: and a head restarted meanwhile would leave this driver talking to a new cluster, which Ray
#: does not survive.
DOWN_AFTER = 2.0
#: How often the GCS port is probed while joined (a loopback or LAN TCP connect: cheap).
PROBE_EVERY = 0.5
#: A probe's own bound (a port that neither accepts nor refuses).
PROBE_TIMEOUT = 2.0
#: How long one join (`ray.init`) may take before it counts as failed.
JOIN_TIMEOUT = 60.0
#: How long reading the cluster id may take (~2-4 ms when the GCS answers).
IDENTIFY_TIMEOUT = 5.0
#: Backoff between join attempts.
RETRY_FIRST, RETRY_MAX = 0.5, 5.0
#: Backoff cap while the cluster refuses this front end's credentials (a configuration fault:
#: only an operator fixes it, so the retries stay rare).
REFUSED_RETRY_MAX = 30.0
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
    """Run `run` in a task group; `check` before using Ray; `connected` is true while usable."""

    def __init__(self, address: str, deployment: str, on_join: Callable[[], Awaitable[None]]) -> None:
        os.environ.setdefault(GCS_RECONNECT_TIMEOUT_ENV, GCS_RECONNECT_TIMEOUT)
        self.address = address
        self.deployment = deployment
        self.on_join = on_join
        self.connected = False
        #: Incremented at every join: a cached Ray handle is only good in the generation it came from.
        self.generation = 0
        #: The id of the cluster joined (hex), when it could be read.
        self.cluster_id: str | None = None
        #: Why the cluster refuses this front end, while it does (calls answer it instead of 5002).
        self.refused: str | None = None
        self.first_attempt = anyio.Event()
        self._calls: set[anyio.CancelScope] = set()
        self._endpoint = gcs_endpoint(address)
        # A cluster-id read left running past its bound (a GCS that accepts but never answers):
        # no second one is started meanwhile, so probes cannot pile threads up.
        self._identifying = False

    def unreachable(self) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"the Ray cluster at {self.address} is unreachable; retrying (retry in a few seconds)"
        )

    def unavailable(self) -> SandboxError:
        """What a call answers while the cluster is not joined: 5001 when it refused us, else 5002."""
        if self.refused is not None:
            return ConfigurationError(self.refused)
        return self.unreachable()

    def check(self) -> None:
        """Raises: ConfigurationError (5001) while the cluster refuses this front end's credentials,
        ServiceUnavailable (5002) while it is otherwise not joined."""
        if not self.connected:
            raise self.unavailable()

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
            except CredentialsRefused as exc:
                self._refuse(str(exc))
                self.first_attempt.set()
                await anyio.sleep(delay)
                delay = min(delay * 2, REFUSED_RETRY_MAX)
                continue
            except Exception as exc:  # any failure to join is retried; Ray raises many kinds
                # Once per outage at warning level: the retries would flood the log.
                level = logging.WARNING if delay == RETRY_FIRST else logging.DEBUG
                log.log(level, "cannot join the Ray cluster at %s (%s); retrying", self.address, exc)
                self.refused = None  # what is wrong now is reaching it (a refusal is re-learned)
                self.first_attempt.set()
                await anyio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_FIRST
            self.first_attempt.set()
            await self._watch()
            await self._leave()

    def _refuse(self, reason: str) -> None:
        # Logged when it starts or changes, not at each retry.
        if reason != self.refused:
            log.error("cannot join the Ray cluster: %s (retrying every %g s at most)", reason, REFUSED_RETRY_MAX)
        self.refused = reason

    async def _join(self) -> None:
        if await self._probe() != "up":
            raise ConnectionError("its GCS port does not accept connections")
        # Before any Ray client is built: with RAY_AUTH_MODE=token and no token, Ray aborts the process.
        problem = local_token_problem(reread=True)
        if problem is not None:
            raise CredentialsRefused(problem)
        expected = await self._identify()
        if expected is None and self._endpoint is not None:
            raise ConnectionError("its GCS does not answer")
        # ray.init retries an unreachable address for a long time: bounded, and off the event loop.
        with anyio.fail_after(JOIN_TIMEOUT):
            try:
                await anyio.to_thread.run_sync(connect, self.address, self.deployment, abandon_on_cancel=True)
            except ray.exceptions.AuthenticationError as exc:
                raise CredentialsRefused(str(exc)) from exc
        joined = _driver_cluster_id()
        if expected is not None and joined != expected:
            # The head was restarted between the two: this driver belongs to a cluster already gone.
            await self._shutdown_driver()
            raise ConnectionError("the cluster changed while joining it")
        self.cluster_id = joined
        self.generation += 1
        try:
            await self.on_join()
        except Exception:
            # Not kept: a driver of a cluster that went away meanwhile would be reused by the next join.
            await self._shutdown_driver()
            raise
        if self.refused is not None:
            log.warning("the Ray cluster at %s accepts this front end's credentials now", self.address)
        self.refused = None
        self.connected = True
        log.info("joined the Ray cluster at %s (generation %d, cluster %s)", self.address, self.generation, joined)

    async def _watch(self) -> None:
        """Return once the GCS refuses connections, goes unanswered for DOWN_AFTER seconds, or belongs
        to another cluster than the one joined."""
        down_since: float | None = None
        while True:
            await anyio.sleep(PROBE_EVERY)
            state = await self._probe()
            if state == "refused":
                log.warning("the GCS at %s refuses connections (the head is down or restarting)", self.address)
                return
            if state == "silent":
                now = anyio.current_time()
                down_since = now if down_since is None else down_since
                if now - down_since >= DOWN_AFTER:
                    log.warning("the GCS at %s has not answered for %g s", self.address, DOWN_AFTER)
                    return
                continue
            down_since = None
            try:
                current = await self._identify()
            except CredentialsRefused:
                current = "a cluster that refuses this front end's token"
            except Exception:  # no answer now: the TCP probe decides
                current = None
            if current is not None and self.cluster_id is not None and current != self.cluster_id:
                log.warning(
                    "the GCS at %s belongs to another cluster now (%s; joined %s): the head was restarted",
                    self.address, current, self.cluster_id,
                )  # fmt: skip
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

    async def _identify(self) -> str | None:
        """The id of the cluster answering at the GCS address; None if it cannot be asked (an
        address that is not host:port, or a read still running from an earlier probe) or did not
        answer within IDENTIFY_TIMEOUT.

        Raises: CredentialsRefused; ray.exceptions.RayError or OSError (no GCS answered)."""
        if self._endpoint is None or self._identifying:
            return None
        self._identifying = True

        def read() -> str:
            try:
                return cluster_id(self.address)
            finally:
                self._identifying = False

        with anyio.move_on_after(IDENTIFY_TIMEOUT):
            return await anyio.to_thread.run_sync(read, abandon_on_cancel=True)
        return None

    async def _probe(self) -> str:
        """The GCS port's state: "up", "refused" (nothing listens: the GCS exited) or "silent" (no answer)."""
        if self._endpoint is None:
            return "up"  # nothing to probe: ray.init and Ray's errors tell
        host, port = self._endpoint
        try:
            with anyio.fail_after(PROBE_TIMEOUT):
                stream = await anyio.connect_tcp(host, port)
        except TimeoutError:
            return "silent"
        except OSError as exc:
            # anyio wraps the socket's error: only a refusal proves nothing listens there.
            refused = isinstance(exc, ConnectionRefusedError) or isinstance(exc.__cause__, ConnectionRefusedError)
            return "refused" if refused else "silent"
        await stream.aclose()
        return "up"


def _driver_cluster_id() -> str:
    """The id (hex) of the cluster this process's driver joined."""
    node: Any = ray._private.worker.global_worker.node
    return str(node.cluster_id.hex())
