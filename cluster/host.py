"""A session host: one Ray actor holding many sessions of one resource (group) on one node.

It runs a normal local `session.engine.Engine` built from the deployment's manifest
(reduced to its resource, or to its group of linked resources: a browser drawn on a desktop
lives beside it), so TTL, grace, adoption, temporary sessions, limits and
isolation tiers are the local code; the backends and sandboxes run on the actor's node.
Beside the engine it keeps the registry's entries for its sessions current, puts the
connection workers of front ends whose lease lapsed into the disconnect grace, and exits
when it has held nothing for a while and no front end is alive.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

import anyio
import ray
from anyio.abc import TaskGroup

from backends.processes import sweep_orphan_dirs, sweep_orphans
from backends.sandbox import sweep_orphans as sweep_sandbox_orphans
from cluster.keys import REGISTRY_NAME, digest, front_end_of
from manifests.schema import Manifest
from mcp_server.factory import engine_from_manifest
from session.engine import Engine
from session.models import Caller, Session
from session.tool_calls import CallOutcome

log = logging.getLogger(__name__)

#: Progress reports a streaming call may have waiting for its front end (more are dropped).
PROGRESS_BUFFER = 64
#: How often a host reports reaped sessions and looks for lapsed front ends.
HOUSEKEEPING_INTERVAL = 1.0


class SessionHost:
    """Plain Python; `cluster.placement` runs it as a detached, named Ray actor (asyncio)."""

    def __init__(self, manifest: Manifest, group: str, node_id: str, name: str, deployment: str, idle_exit: float):
        members = group.split("+")
        self.manifest = manifest.model_copy(update={"resources": {r: manifest.resources[r] for r in members}})
        self.resource = group
        self.node_id = node_id
        self.name = name
        self.deployment = deployment
        self.idle_exit = idle_exit
        self.engine: Engine | None = None
        self._ready: anyio.Event | None = None
        self._stop: anyio.Event | None = None
        self._stopped: anyio.Event | None = None
        self._serving = False
        self._tg: TaskGroup | None = None
        self._registry: Any = None
        # What the registry was last told: handle -> digest, (worker key, resource) -> digest pair.
        self._handles: dict[str, str] = {}
        self._defaults: dict[tuple[str, str], tuple[str, str]] = {}
        self._handled_front_ends: set[str] = set()
        self._epoch: str | None = None

    # -- lifetime --------------------------------------------------------------------

    async def serve(self) -> None:
        """Run the engine until `stop` (or idleness); every front end calls it, the first one runs it."""
        if self._serving:
            return
        self._serving = True
        ready = self._ready_event()
        self._stop, self._stopped = anyio.Event(), anyio.Event()
        self._registry = ray.get_actor(REGISTRY_NAME, namespace=self.deployment)
        await self._registry.register_host.remote(self.name, self.resource, self.node_id)
        await _sweep_dead_servers()
        try:
            async with engine_from_manifest(self.manifest) as engine:
                self.engine = engine
                ready.set()
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    tg.start_soon(self._housekeeping)
                    await self._stop.wait()
                    tg.cancel_scope.cancel()
        finally:
            self.engine = None
            ready.set()  # callers waiting for an engine that will never be are told so
            with anyio.CancelScope(shield=True):
                await self._registry.drop_host.remote(self.name)
            log.info("session host %s stopped", self.name)
            self._stopped.set()
        ray.actor.exit_actor()  # type: ignore[no-untyped-call]

    def _ready_event(self) -> anyio.Event:
        if self._ready is None:
            self._ready = anyio.Event()
        return self._ready

    async def _engine(self) -> Engine:
        await self._ready_event().wait()
        if self.engine is None:
            raise RuntimeError(f"session host {self.name} is stopping")
        return self.engine

    async def ready(self) -> dict[str, Any]:
        await self._engine()
        return {"name": self.name, "node_id": self.node_id, "pid": os.getpid()}

    async def stop(self) -> None:
        """Destroy every session, then exit (an operator's clean stop); returns once the sessions are gone."""
        if self._stop is None or self._stopped is None:
            ray.actor.exit_actor()  # type: ignore[no-untyped-call]
            return
        self._stop.set()
        await self._stopped.wait()

    # -- calls -----------------------------------------------------------------------

    async def call(self, caller: Caller, tool_name: str, arguments: dict[str, Any]) -> CallOutcome:
        engine = await self._engine()
        outcome = await engine.call(caller, tool_name, arguments)
        await self._sync()
        return outcome

    async def call_streaming(
        self, caller: Caller, tool_name: str, arguments: dict[str, Any]
    ) -> AsyncIterator[tuple[Any, ...]]:
        """`call`, as a Ray streaming generator: ("progress", done, total, message) items as the tool
        reports them, then ("done", outcome). Closing it (the front end's caller gave up) cancels the call."""
        engine = await self._engine()
        assert self._tg is not None
        send, receive = anyio.create_memory_object_stream[tuple[Any, ...]](max_buffer_size=PROGRESS_BUFFER)
        scope = anyio.CancelScope()

        async def progress(done: float, total: float | None = None, message: str | None = None) -> None:
            with suppress(anyio.WouldBlock, anyio.ClosedResourceError):  # advisory: drop what cannot be sent
                send.send_nowait(("progress", done, total, message))

        async def run() -> None:
            with scope:
                outcome = await engine.call(caller, tool_name, arguments, progress=progress)
                await self._sync()
                with suppress(anyio.ClosedResourceError):
                    await send.send(("done", outcome))
            send.close()

        # Run in the host's task group, not in this generator: a generator must not hold a task group
        # open across its yields.
        self._tg.start_soon(run)
        try:
            async with receive:
                async for item in receive:
                    yield item
        finally:
            scope.cancel()

    async def disconnect(self, worker_key: str) -> None:
        engine = await self._engine()
        engine.disconnect(worker_key)
        await self._sync()

    async def probe(self, resource: str, attribute: str) -> Any:
        """One attribute of this host's backend object (diagnostics and tests: e.g. how many live states)."""
        engine = await self._engine()
        return getattr(engine.backends[resource], attribute)

    async def counts(self) -> dict[str, int]:
        engine = await self._engine()
        return {"sessions": len(engine.sessions), "workers": len(engine.workers), "pid": os.getpid()}

    # -- the registry ----------------------------------------------------------------

    async def _sync(self) -> None:
        """Tell the registry what changed since the last sync.

        Additions are awaited (a handle returned to a client must be findable by every front
        end before the result leaves); removals are not (a stale entry only costs a miss).
        """
        engine = self.engine
        if engine is None:
            return
        known, live = self._handles, engine.sessions
        added = [h for h in live.keys() - known.keys()]
        removed = [h for h in known.keys() - live.keys()]
        current = {(w.key, r) for w in engine.workers.values() for r, s in w.sessions.items() if s.live}
        defaults_added = [pair for pair in current - self._defaults.keys()]
        defaults_removed = [pair for pair in self._defaults.keys() - current]
        if not (added or removed or defaults_added or defaults_removed):
            return
        for handle in added:
            known[handle] = digest(handle)
        for pair in defaults_added:
            self._defaults[pair] = (digest(pair[0]), pair[1])
        update = self._registry.sync.remote(
            self.name,
            [(known[h], *self._counted_against(live[h])) for h in added],
            [known.pop(h) for h in removed],
            [self._defaults[p] for p in defaults_added],
            [self._defaults.pop(p) for p in defaults_removed],
            len(live),
        )
        if added or defaults_added:
            await update

    @staticmethod
    def _counted_against(session: Session) -> tuple[str | None, str | None]:
        """The (principal, worker digest) the engine's budget counts `session` against."""
        principal, worker = session.budget_key or (None, None)
        return principal, digest(worker) if worker is not None else None

    async def _housekeeping(self) -> None:
        idle_since: float | None = None
        while True:
            await anyio.sleep(HOUSEKEEPING_INTERVAL)
            engine = self.engine
            if engine is None:
                return
            try:
                epoch, lapsed_now, live_front_ends = await self._registry.host_tick.remote()
                if epoch != self._epoch:
                    await self._rejoin(epoch)
                await self._sync()
                lapsed = set(lapsed_now) - self._handled_front_ends
                if lapsed:
                    self._disconnect_front_ends(engine, lapsed)
                # Workers without sessions hold nothing (a `_meta` key worker is never forgotten by the
                # engine): counting them kept a host alive forever once such a worker had called it.
                if engine.sessions or live_front_ends:
                    idle_since = None
                elif idle_since is None:
                    idle_since = anyio.current_time()
                elif anyio.current_time() - idle_since >= self.idle_exit:
                    log.info("session host %s exits: idle, and no front end for %.0f s", self.name, self.idle_exit)
                    assert self._stop is not None
                    self._stop.set()
            except ray.exceptions.RayError as exc:
                log.warning("session host %s cannot reach the registry: %s", self.name, exc)
                with suppress(ValueError, ray.exceptions.RayError):  # a replaced registry is found next time
                    self._registry = await anyio.to_thread.run_sync(
                        lambda: ray.get_actor(REGISTRY_NAME, namespace=self.deployment)
                    )

    async def _rejoin(self, epoch: str) -> None:
        """A registry started afresh knows nothing of this host: tell it everything (the next sync)."""
        if self._epoch is not None:
            log.warning("session host %s re-registers its sessions with a new registry", self.name)
        self._handles.clear()
        self._defaults.clear()
        await self._registry.register_host.remote(self.name, self.resource, self.node_id)
        self._epoch = epoch

    def _disconnect_front_ends(self, engine: Engine, front_ends: set[str]) -> None:
        """Connections of a front end that died (its lease lapsed) will never close: start their grace."""
        for key in list(engine.workers):
            if front_end_of(key) in front_ends:
                log.info("a front end's lease lapsed: its connection worker's sessions enter the grace")
                engine.disconnect(key)
        # Workers of a lapsed front end can appear later only through a call routed by it: none.
        self._handled_front_ends |= front_ends


async def _sweep_dead_servers() -> None:
    """What a host (or server) on this node that died without cleaning up left: the same sweep a
    local server makes at start. Live servers' and hosts' processes are never touched."""
    await sweep_sandbox_orphans()
    orphans = await anyio.to_thread.run_sync(sweep_orphans)
    dirs = await anyio.to_thread.run_sync(sweep_orphan_dirs)
    if orphans or dirs:
        log.warning("cleaned up after a dead server: %d processes, %d directories", len(orphans), len(dirs))
