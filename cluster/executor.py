"""The Ray front end: the Engine surface mcp_server uses, with every session on a session host.

It keeps no session state: a call naming a session goes where the registry says the
handle lives; a call without one goes to the host holding the caller's default session
of that resource, else to a host chosen by placement (which runs it in a temporary
session); listing, refreshing and destroying "all of mine" fan out to every host and
merge. Connection workers are made unique per front end (their ids are only unique per
process); `_meta` worker keys name the same worker through every front end.
"""

from __future__ import annotations

import logging
import secrets
from contextlib import AsyncExitStack, suppress
from types import TracebackType
from typing import Any, Self

import anyio
import ray
from anyio.abc import TaskGroup

from backends.base import Backend, BackendKind, ProgressFn, ToolSpec
from cluster import faults
from cluster.connection import JOIN_TIMEOUT, RayConnection
from cluster.keys import connection_worker, digest, host_name, link_groups, node_resource
from cluster.merge import merge_created, merge_listed, merge_status, merge_warmup
from cluster.placement import Host, Placement, gcs
from cluster.registry import Location
from manifests.schema import Manifest
from mcp_server.factory import engine_from_manifest
from session.engine import MAX_TOOL_NAME, UNKNOWN_HANDLE
from session.envelope import ResultMeta, failure
from session.errors import (
    ConfigurationError,
    ParameterError,
    ResourceUnavailable,
    SandboxError,
    ServiceUnavailable,
    SessionError,
)
from session.meta_tools import CreateSessionArgs, DestroySessionArgs, RefreshArgs, ReinitializeArgs, WarmupArgs
from session.models import Caller
from session.tool_calls import CallOutcome, normalise_request, validate_arguments

log = logging.getLogger(__name__)

#: A front end renews its lease this often; a lease not renewed for LEASE_TTL has lapsed.
LEASE_INTERVAL = 2.0
LEASE_TTL = 10.0
#: Handle -> location entries a front end remembers (a session never moves, so they stay true).
LOCATION_CACHE = 100_000


class RayExecutor:
    """Front end of the ray executor; an async context manager (joins the cluster on entry)."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        address: str | None = None,
        front_end_id: str | None = None,
        lease_ttl: float = LEASE_TTL,
        host_idle_exit: float | None = None,
    ) -> None:
        settings = manifest.server
        address = address or settings.ray_address
        if not address:
            raise ConfigurationError("executor 'ray' needs the cluster's address: --ray-address or server.ray_address")
        self.address = address
        self.deployment = settings.deployment
        self.front_end = front_end_id or secrets.token_hex(6)
        self.lease_ttl = lease_ttl
        # Built for its catalog and schemas only: never entered, so no backend process starts here.
        self._schema = engine_from_manifest(manifest.model_copy(update={"resources": _without_pools(manifest)}))
        self.catalog: dict[str, ToolSpec] = self._schema.catalog
        self.session_ttl = self._schema.session_ttl
        self.disconnect_grace = self._schema.disconnect_grace
        if host_idle_exit is None:
            host_idle_exit = settings.ray_host_idle_exit
        groups = link_groups({name: set(b.links.values()) for name, b in self._schema.backends.items()})
        self.placement = Placement(
            manifest.model_copy(update={"server": _without_tokens(manifest)}), self.deployment, groups, host_idle_exit
        )
        self._locations: dict[str, Location] = {}
        # Connection worker -> resource -> host of its default session. Only this front end routes
        # a connection's calls, so only its own calls can give one a default: the entry is dropped
        # at each call that may (meta-tools, calls by handle). A default that ended meanwhile (TTL,
        # grace) only sends the next call to a host that runs it in a temporary session, as it should.
        self._defaults: dict[str, dict[str, Host]] = {}
        self.connection = RayConnection(self.address, self.deployment, self._joined)
        self._stack: AsyncExitStack | None = None
        self._tg: TaskGroup | None = None
        self._stopped = False

    @property
    def backends(self) -> dict[str, Backend[Any, Any]]:
        return self._schema.backends

    # -- lifetime --------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        stack = AsyncExitStack()
        await stack.__aenter__()
        self._tg = await stack.enter_async_context(anyio.create_task_group())
        self._stack = stack
        # Serving does not wait for the cluster: until it is joined, calls answer 5002. The first
        # attempt is awaited, so a reachable cluster is joined before the first call.
        self._tg.start_soon(self.connection.run, name="ray-front-end-connection")
        with anyio.move_on_after(JOIN_TIMEOUT):
            await self.connection.first_attempt.wait()
        self._tg.start_soon(self._lease_forever, name="ray-front-end-lease")
        return self

    async def _joined(self) -> None:
        """(Re)joined the cluster: nothing learned from an earlier one holds (a restarted head has
        none of its actors), so routing starts afresh from the registry, which on a new cluster
        knows no old handle (1003)."""
        self.placement.reset()
        self._locations.clear()
        self._defaults.clear()
        try:
            await gcs(self.placement.join_registry)
            await self._registry("heartbeat", self.front_end, self.lease_ttl)
        except (ray.exceptions.RayError, SandboxError) as exc:
            raise ConnectionError(f"the registry did not answer: {exc}") from exc
        log.info("front end %s joined Ray at %s (deployment %r)", self.front_end, self.address, self.deployment)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        await self.shutdown()
        assert self._stack is not None
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            return await self._stack.__aexit__(exc_type, exc, tb)
        finally:
            self._tg = self._stack = None

    async def shutdown(self) -> None:
        """Give up the lease: this front end's connections' sessions enter the grace (the sessions
        themselves belong to the cluster and outlive any front end). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if not self.connection.connected:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            try:
                await self._registry("release", self.front_end)
            except SandboxError:
                log.warning("could not release the lease of front end %s; it lapses by itself", self.front_end)

    async def _lease_forever(self) -> None:
        while True:
            await anyio.sleep(min(LEASE_INTERVAL, self.lease_ttl / 3))
            if not self.connection.connected:
                continue
            try:
                await self._registry("heartbeat", self.front_end, self.lease_ttl)
            except SandboxError as exc:
                log.warning("front end %s cannot renew its lease: %s", self.front_end, exc.message)

    # -- the Engine surface ----------------------------------------------------------

    async def call(
        self, caller: Caller | str | None, tool_name: str, arguments: Any, *, progress: Any = None
    ) -> CallOutcome:
        """Route one tool call; always returns an envelope. Progress a backend tool reports reaches `progress`."""
        caller = self._scoped(Caller.of(caller))
        started = anyio.current_time()
        meta = ResultMeta(tool=tool_name[:MAX_TOOL_NAME])
        try:
            spec = self._schema.pool.find_tool(tool_name, self.catalog)
            meta.tool, meta.resource_type = spec.name, spec.resource
            args = dict(arguments or {})
            self.connection.check()
            with anyio.CancelScope() as scope:
                self.connection.track(scope)
                try:
                    if spec.owner == "engine":
                        outcome = await self._meta_tool(caller, spec, args, meta)
                        if outcome.envelope.meta is meta:  # merged here from several hosts' replies
                            meta.execution_time_ms = round((anyio.current_time() - started) * 1000, 3)
                        return outcome
                    return await self._backend_tool(caller, spec, tool_name, args, progress)
                finally:
                    self.connection.untrack(scope)
            raise self.connection.unavailable()  # the cluster was given up during the call
        except Exception as exc:  # SandboxErrors keep their code; anything else is 5000
            envelope = failure(exc, meta)
            meta.execution_time_ms = round((anyio.current_time() - started) * 1000, 3)
            return CallOutcome(envelope)

    call_tool = call

    def disconnect(self, worker_key: str) -> None:
        """A connection of this front end closed: the hosts holding its sessions start their grace."""
        if self._tg is not None and self.connection.connected:
            self._tg.start_soon(self.disconnect_and_wait, worker_key)

    async def disconnect_and_wait(self, worker_key: str) -> None:
        """`disconnect`, returning once every host concerned has started the grace."""
        principal, _, worker = worker_key.partition("/")
        scoped = connection_worker(self.front_end, worker)
        self._defaults.pop(f"{principal}/{scoped}", None)
        if scoped.startswith("conn:"):
            # A connection's worker is routed by its own front end only: the hosts it knows are all.
            hosts = list(self.placement.hosts.values())
        else:
            # A `_meta` key's sessions may have been made through any front end.
            try:
                hosts = await self._fan_out_hosts()
            except SandboxError as exc:
                log.warning("cannot tell the hosts that a client disconnected: %s", exc.message)
                return
        for host in hosts:
            with suppress(ray.exceptions.RayError):  # a lost host has no sessions left to grace
                await host.actor.disconnect.remote(f"{principal}/{scoped}")

    def status(self, caller: Caller | str | None = None) -> dict[str, Any]:
        return {
            "executor": "ray",
            "front_end": self.front_end,
            "deployment": self.deployment,
            "session_ttl": self.session_ttl,
            "disconnect_grace": self.disconnect_grace,
            "hosts_known": sorted(self.placement.hosts),
            "cluster_connected": self.connection.connected,
        }

    async def hosts_of(self, resource: str) -> list[Host]:
        """The running hosts of `resource` (diagnostics and tests)."""
        hosts = [h for h in await self._fan_out_hosts() if resource in h.resource.split("+")]
        return sorted(hosts, key=lambda h: h.name)

    async def stop_deployment(self) -> None:
        """Stop every session host of this deployment (their sessions are destroyed) and its registry.

        An operator's (and the tests') teardown; front ends of the deployment answer 5002 until
        one of them starts a host again.
        """
        hosts = await self._registry("all_hosts")
        async with anyio.create_task_group() as tg:
            for name, info in hosts.items():
                tg.start_soon(self._stop_host, Location(name, info.node_id, info.resource))
        registry = self.placement.registry
        self._stopped = True  # no lease left to release
        await gcs(lambda: ray.kill(registry, no_restart=True))

    async def _stop_host(self, where: Location) -> None:
        host = await self._attach(where)
        if host is None:
            return
        with suppress(ray.exceptions.RayActorError):  # it exits as it answers
            await host.actor.stop.remote()
        self.placement.forget(host.name)

    def _scoped(self, caller: Caller) -> Caller:
        if caller.worker is None:
            return caller
        return Caller(caller.principal, connection_worker(self.front_end, caller.worker))

    # -- backend tools ---------------------------------------------------------------

    async def _backend_tool(
        self, caller: Caller, spec: ToolSpec, tool_name: str, args: dict[str, Any], progress: ProgressFn | None
    ) -> CallOutcome:
        resource = spec.resource
        assert resource is not None
        if self.backends[resource].kind() is BackendKind.SHARED:
            return await self._placed_call(resource, caller, tool_name, args, progress=progress)
        handle = args.get("session_id") if spec.takes_session else None
        if handle is not None:
            if not isinstance(handle, str):
                raise ParameterError("session_id must be the string create_session returned")
            if caller.worker_key is not None:
                self._defaults.pop(caller.worker_key, None)  # the call may adopt the session
            holder = await self._host_of(handle)
            return await self._forward(holder, caller, tool_name, args, handle=handle, progress=progress)
        host = await self._default_host(caller, resource)
        if host is None:
            return await self._placed_call(resource, caller, tool_name, args, progress=progress)
        return await self._forward(host, caller, tool_name, args, progress=progress)

    # -- meta-tools ------------------------------------------------------------------

    async def _meta_tool(self, caller: Caller, spec: ToolSpec, args: dict[str, Any], meta: ResultMeta) -> CallOutcome:
        name = spec.name
        if not spec.read_only and caller.worker_key is not None:
            self._defaults.pop(caller.worker_key, None)
        parsed = validate_arguments(spec, args)
        if name == "create_session":
            assert isinstance(parsed, CreateSessionArgs)
            return await self._create(caller, parsed, args, meta)
        if name in ("destroy_session", "refresh_sessions", "reinitialize"):
            assert isinstance(parsed, DestroySessionArgs | RefreshArgs | ReinitializeArgs)
            if parsed.session_id is not None:
                host = await self._host_of(parsed.session_id)
                return await self._forward(host, caller, name, args, handle=parsed.session_id)
            if isinstance(parsed, ReinitializeArgs):
                return await self._reinitialize(caller, parsed, args)
            resources = [parsed.resource] if isinstance(parsed.resource, str) else parsed.resource
            if resources is not None:
                return await self._by_default(caller, name, resources, meta)
            key = "destroyed" if name == "destroy_session" else "refreshed"
            return merge_listed(await self._fan_out(caller, name, args), key, meta)
        if name == "list_sessions":
            return merge_listed(await self._fan_out(caller, name, args), "sessions", meta)
        if name == "warmup":
            assert isinstance(parsed, WarmupArgs)
            return await self._warmup(caller, parsed, meta)
        if name == "get_status":
            return merge_status(self.status(), self._schema.status(), await self._fan_out(caller, name, {}), meta)
        raise ParameterError(f"{name} is not available on the ray executor")

    async def _create(
        self, caller: Caller, parsed: CreateSessionArgs, args: dict[str, Any], meta: ResultMeta
    ) -> CallOutcome:
        wanted = normalise_request(parsed.resource, parsed.config)
        for resource in wanted:
            self._schema.pool.session_backend(resource)
        defaults = {resource: await self._default_host(caller, resource) for resource in wanted}
        await self._admit(caller, sum(1 for host in defaults.values() if host is None))
        if len(wanted) == 1:
            [resource] = wanted
            host = defaults[resource] or await self._linked_host(resource, wanted[resource])
            if host is None:
                return await self._placed_call(resource, caller, "create_session", args, reserve=True)
            return await self._forward(host, caller, "create_session", args)
        # Several resources live on several hosts: one create each, all or nothing.
        outcomes: dict[str, CallOutcome | BaseException] = {}

        async def create_one(resource: str, config: Any) -> None:
            try:
                one = {"resource": {resource: config}}
                host = defaults[resource]
                if host is None:
                    outcomes[resource] = await self._placed_call(resource, caller, "create_session", one, reserve=True)
                else:
                    outcomes[resource] = await self._forward(host, caller, "create_session", one)
            except SandboxError as exc:
                outcomes[resource] = exc

        async with anyio.create_task_group() as tg:
            for resource, config in wanted.items():
                tg.start_soon(create_one, resource, config)
        ordered = [outcomes[r] for r in wanted]
        failed = next((o for o in ordered if isinstance(o, BaseException) or not o.envelope.ok), None)
        if failed is None:
            return merge_created([o for o in ordered if isinstance(o, CallOutcome)], caller, meta)
        with anyio.CancelScope(shield=True):
            for outcome in ordered:
                if isinstance(outcome, CallOutcome) and outcome.envelope.ok:
                    for made in outcome.envelope.data.get("sessions", []):
                        if made.get("created"):
                            await self._destroy_quietly(caller, made["session_id"])
        if isinstance(failed, BaseException):
            raise failed
        return failed

    async def _linked_host(self, resource: str, config: Any) -> Host | None:
        """The host of the session a new `resource` session links to (a browser on a vm's display):
        a link hands that session's live state to the new one's start, so both live on one host."""
        for field, target in self.backends[resource].links.items():
            handle = (config or {}).get(field) if isinstance(config, dict) else None
            if not isinstance(handle, str):
                continue
            try:
                return await self._host_of(handle)
            except SessionError:
                # As the engine words it; the value is not echoed (it may be a handle).
                raise ParameterError(
                    f"{field} must be the session_id of one of your live {target!r} sessions "
                    "(the value given names none)"
                ) from None
        return None

    async def _destroy_quietly(self, caller: Caller, handle: str) -> None:
        try:
            host = await self._host_of(handle)
            await self._forward(host, caller, "destroy_session", {"session_id": handle}, handle=handle)
        except SandboxError as exc:
            log.warning("rolling back a multi-resource create: %s", exc.message)

    async def _reinitialize(self, caller: Caller, parsed: ReinitializeArgs, args: dict[str, Any]) -> CallOutcome:
        if parsed.resource is None:
            raise ParameterError("reinitialize needs resource (e.g. 'bash') or session_id")
        self._schema.pool.session_backend(parsed.resource)
        host = await self._default_host(caller, parsed.resource)
        if host is None:
            await self._admit(caller, 1)
            return await self._placed_call(parsed.resource, caller, "reinitialize", args, reserve=True)
        return await self._forward(host, caller, "reinitialize", args)

    async def _admit(self, caller: Caller, count: int) -> None:
        """The caps per principal and per worker, across the cluster (each host also applies the
        manifest's caps to its own sessions). Raises: ResourceUnavailable (2004), as the engine words it."""
        limits = self._schema.budget.limits
        if count == 0 or (limits.per_principal is None and limits.per_worker is None):
            return
        worker = digest(caller.worker_key) if caller.worker_key is not None else None
        over = await self._registry("admit", caller.principal, worker, count, limits.per_principal, limits.per_worker)
        if over == "principal":
            raise ResourceUnavailable(
                f"your credentials' session limit ({limits.per_principal}) is reached; destroy sessions you no "
                "longer need"
            )
        if over == "worker":
            raise ResourceUnavailable(
                f"this client's session limit ({limits.per_worker}) is reached; destroy sessions you no longer need"
            )

    async def _by_default(self, caller: Caller, name: str, resources: list[str], meta: ResultMeta) -> CallOutcome:
        """destroy/refresh naming resources: each is the caller's default session of it, wherever it lives."""
        wanted = list(dict.fromkeys(resources))
        for resource in wanted:
            self._schema.pool.backend(resource)
        where: dict[str, Host] = {}
        for resource in wanted:
            host = await self._default_host(caller, resource)
            if host is None:
                have = await self._default_resources(caller)
                raise SessionError(
                    f"you have no {resource!r} session to use without a session_id (your sessions: {have}); "
                    f"create one with create_session({resource!r}), or pass the session_id you were given"
                )
            where[resource] = host
        by_host: dict[str, list[str]] = {}
        for resource, host in where.items():
            by_host.setdefault(host.name, []).append(resource)
        results: list[tuple[Host, CallOutcome]] = []
        for names in by_host.values():
            host = where[names[0]]
            # refresh_sessions names one resource at most; destroy_session takes a list.
            args: dict[str, Any] = {"resource": names if name == "destroy_session" else names[0]}
            results.append((host, await self._forward(host, caller, name, args)))
        key = "destroyed" if name == "destroy_session" else "refreshed"
        return merge_listed(results, key, meta, order=wanted)

    async def _default_resources(self, caller: Caller) -> str:
        if caller.worker_key is None:
            return "none"
        found = await self._registry("defaults_of", digest(caller.worker_key))
        return ", ".join(sorted(found)) if found else "none"

    async def _warmup(self, caller: Caller, parsed: WarmupArgs, meta: ResultMeta) -> CallOutcome:
        names = [parsed.resources] if isinstance(parsed.resources, str) else parsed.resources
        if names is None:
            names = list(self.backends)
        for resource in names:
            self._schema.pool.backend(resource)
        results: list[tuple[Host, CallOutcome]] = []
        for resource in names:
            for node_id in await self.placement.eligible(resource):
                host = await self._start_host(resource, node_id)
                results.append((host, await self._forward(host, caller, "warmup", {"resources": [resource]})))
        return merge_warmup(results, meta)

    # -- routing ---------------------------------------------------------------------

    async def _host_of(self, handle: str) -> Host:
        """The host holding the session `handle` names. Raises: SessionError (unknown or lost)."""
        key = digest(handle)
        where = self._locations.get(key)
        if where is None:
            where = await self._registry("lookup", key)
            if where is True:
                raise ServiceUnavailable("the session registry is being rebuilt after a fault; retry in a few seconds")
            if where is None:
                raise SessionError(UNKNOWN_HANDLE)
            if len(self._locations) >= LOCATION_CACHE:
                self._locations.clear()
            self._locations[key] = where
        host = await self._attach(where)
        if host is None:
            raise await self._lost(Host(where.host, where.node_id, where.resource, None))
        return host

    async def _attach(self, where: Location) -> Host | None:
        try:
            return await self.placement.known_host(where.host, where.node_id, where.resource)
        except ray.exceptions.RayError as exc:
            raise faults.unreachable(exc) from exc

    async def _default_host(self, caller: Caller, resource: str) -> Host | None:
        """The host holding the caller's worker's default session of `resource`, if it has one."""
        key = caller.worker_key
        if key is None:
            return None
        cached = self._defaults.get(key, {}).get(resource)
        if cached is not None:
            return cached
        where = await self._registry("default", digest(key), resource)
        host = None if where is None else await self._attach(where)
        if host is not None and caller.worker is not None and caller.worker.startswith("conn:"):
            self._defaults.setdefault(key, {})[resource] = host
        return host

    async def _placed_call(
        self,
        resource: str,
        caller: Caller,
        tool_name: str,
        args: dict[str, Any],
        *,
        reserve: bool = False,
        progress: ProgressFn | None = None,
    ) -> CallOutcome:
        """A call that makes a new (or temporary) session, on a host placement picks; a host found gone
        (exited, or lost with its node) is forgotten and the call placed once more."""
        try:
            return await self._forward(
                await self._placed(resource, reserve=reserve), caller, tool_name, args, progress=progress
            )
        except faults.HostLost:
            return await self._forward(
                await self._placed(resource, reserve=reserve), caller, tool_name, args, progress=progress
            )

    async def _placed(self, resource: str, *, reserve: bool = False) -> Host:
        """A host for a new (or temporary) session: an eligible node's, the one with the fewest sessions."""
        try:
            nodes = await self.placement.eligible(resource)
        except ray.exceptions.RayError as exc:
            raise faults.unreachable(exc) from exc
        if not nodes:
            pins = self.placement.manifest.resources[resource].nodes
            where = f" and one of {', '.join(f'agentflow.node.{p}' for p in pins)}" if pins else ""
            raise ResourceUnavailable(
                f"no live node of the Ray cluster runs {resource!r} sessions (a node does when it advertises "
                f"the custom resource {node_resource(resource)!r}{where})"
            )
        group = self.placement.groups.get(resource, resource)
        candidates = [host_name(group, node) for node in nodes]
        chosen = candidates[0] if len(candidates) == 1 else await self._registry("place", candidates, reserve)
        return await self._start_host(resource, nodes[candidates.index(chosen)])

    async def _start_host(self, resource: str, node_id: str) -> Host:
        try:
            return await self.placement.host(resource, node_id)
        except TimeoutError:
            raise ServiceUnavailable(f"the {resource!r} session host did not start in time; retry") from None
        except ray.exceptions.RayError as exc:
            raise faults.unreachable(exc) from exc

    async def _forward(
        self,
        host: Host,
        caller: Caller,
        tool_name: str,
        args: dict[str, Any],
        *,
        handle: str | None = None,
        progress: ProgressFn | None = None,
    ) -> CallOutcome:
        try:
            if progress is None:
                ref = host.actor.call.remote(caller, tool_name, args)
                try:
                    outcome: CallOutcome = await ref
                except anyio.get_cancelled_exc_class():
                    ray.cancel(ref)  # the client gave up: stop the call on the host too
                    raise
            else:
                outcome = await self._streamed(host, caller, tool_name, args, progress)
        except ray.exceptions.RayError as exc:
            if faults.is_actor_dead(exc):
                raise await self._lost(host) from None
            raise faults.unreachable(exc) from None
        if handle is not None and outcome.envelope.code == SessionError.code:
            self._locations.pop(digest(handle), None)
        return outcome

    async def _streamed(
        self, host: Host, caller: Caller, tool_name: str, args: dict[str, Any], progress: ProgressFn
    ) -> CallOutcome:
        """A call whose progress reports reach `progress` as the host sends them."""
        stream = host.actor.call_streaming.options(num_returns="streaming").remote(caller, tool_name, args)
        try:
            async for ref in stream:
                item = await ref
                if item[0] == "done":
                    done: CallOutcome = item[1]
                    return done
                await progress(*item[1:])
        except anyio.get_cancelled_exc_class():
            ray.cancel(stream)
            raise
        raise ServiceUnavailable(f"the {host.resource!r} session host ended the call without a result; retry")

    async def _fan_out_hosts(self) -> list[Host]:
        """Every running host of the deployment (any front end may have started it)."""
        hosts = await self._registry("all_hosts")
        found = [await self._attach(Location(name, info.node_id, info.resource)) for name, info in hosts.items()]
        return [host for host in found if host is not None]

    async def _fan_out(self, caller: Caller, tool_name: str, args: dict[str, Any]) -> list[tuple[Host, CallOutcome]]:
        """The call on every live host of the deployment, concurrently; lost hosts are skipped."""
        results: list[tuple[Host, CallOutcome]] = []

        async def one(host: Host) -> None:
            try:
                results.append((host, await self._forward(host, caller, tool_name, args)))
            except SessionError:
                return  # lost with its node: nothing of it to list any more

        try:
            async with anyio.create_task_group() as tg:
                for host in await self._fan_out_hosts():
                    tg.start_soon(one, host)
        except ExceptionGroup as group:
            # A host unreachable (5002) makes the whole answer that, not an internal error (5000).
            failure = next((e for e in group.exceptions if isinstance(e, SandboxError)), None)
            if failure is None:
                raise
            raise failure from None
        return results

    async def _lost(self, host: Host) -> SandboxError:
        """A host that is gone: forget it everywhere; say whether its node was lost."""
        self.placement.forget(host.name)
        self._locations = {k: v for k, v in self._locations.items() if v.host != host.name}
        for hosts in self._defaults.values():
            for resource in [r for r, h in hosts.items() if h.name == host.name]:
                del hosts[resource]
        try:
            alive = await self.placement.node_alive(host.node_id)
            self.placement.registry.drop_host.remote(host.name)
        except ray.exceptions.RayError as exc:
            return faults.unreachable(exc)
        log.warning("session host %s is gone (its node is %s)", host.name, "alive" if alive else "dead")
        return faults.lost(alive)

    async def _registry(self, method: str, *args: Any) -> Any:
        """One registry call; Ray's failures become 5002. A lost registry is replaced (a new, empty one,
        which the hosts refill) and the call made once more."""
        for attempt in range(2):
            try:
                return await getattr(self.placement.registry, method).remote(*args)
            except ray.exceptions.RayError as exc:
                if attempt == 0 and faults.is_actor_dead(exc):
                    await gcs(self.placement.join_registry)
                    continue
                raise faults.unreachable(exc) from None
        raise AssertionError("unreachable")


def _without_pools(manifest: Manifest) -> dict[str, Any]:
    return {name: spec.model_copy(update={"pool": 0}) for name, spec in manifest.resources.items()}


def _without_tokens(manifest: Manifest) -> Any:
    """Hosts never authenticate anyone: the tokens stay with the front ends."""
    return manifest.server.model_copy(update={"tokens": {}})
