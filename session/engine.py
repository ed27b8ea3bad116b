"""The session engine: callers, workers, explicit and temporary sessions, handles, TTL, calls.

Locking discipline (the original server's global lock across backend I/O is what this
avoids): registry changes happen between awaits, so they need no lock at all. A new
session reserves its slot in state CREATING, `initialize` runs with no lock held, and
the slot is published or rolled back. Calls on one session queue on that session's
FIFO lock; calls on different sessions never wait for each other.

Every live explicit session is reachable by its handle (`session_id`) from any caller of
the same principal; a worker additionally has one default session per resource, used by
its calls that name no session. A disconnected worker's sessions wait out a grace in
which a call by handle adopts them; then they are destroyed.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AsyncExitStack, contextmanager, nullcontext, suppress
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup
from pydantic import BaseModel

from backends.base import Backend, BackendKind, Runtime, SessionSetup, ToolContext, ToolSpec
from backends.policy import split_policy_request
from session.backend_pool import BackendPool
from session.budget import Limits, SessionBudget

__all__ = ["Caller", "Engine", "Limits"]
from session.envelope import ResultMeta, failure, success
from session.errors import (
    ConfigurationError,
    ParameterError,
    PermissionDenied,
    ResourceUnavailable,
    SandboxError,
    ServiceUnavailable,
    SessionError,
)
from session.models import Caller, Session, SessionStatus, SessionView, Worker, new_handle
from session.reaper import collect_expired
from session.tool_calls import CallOutcome, ToolCall, invoke, normalise_request, validate_arguments
from session.warm_pool import PoolSize, WarmPool

log = logging.getLogger(__name__)

CLEANUP_TIMEOUT = 30.0
#: A background cleanup (after a kill) and a pool refill wait this long first, so the call
#: that killed or took a session sends its result before their work competes for the loop.
BACKGROUND_DELAY = 0.005
#: After a pool member failed to start, wait this long before trying again.
POOL_RETRY = 5.0
#: Pool refills (and surplus stops) wait while more sessions than this (and than the pool's
#: target) are starting for callers that wait for them: those starts keep the cores busy, and a
#: background start only slows them. bench/bench_starts.py, 50 concurrent creates on a fixed
#: pool of 8 (42 cold starts): 325 ms with the refill deferred, 393 ms without (medians of 3).
#: Steady load the pool can serve stays under it: there refilling is what keeps callers served
#: (3 workers of back-to-back temporary calls, deferred whenever 2 calls wanted a session:
#: 3x the misses, p50 15.7 ms instead of 8.8 ms).
REFILL_DEFER_ABOVE = os.cpu_count() or 2
#: Growing a pool (members beyond its base) is for the next burst, not this moment's calls:
#: one start at a time, and none while the server process used more than GROWTH_BUSY_SHARE of
#: a core since the last look (at least GROWTH_RECHECK seconds ago). Measured: growing by ~50
#: members 4 at a time right after 50 workers created their sessions cut their 50x20 calls/s
#: from ~2,900 to ~2,400 (bench_core throughput, pool_max 8 vs 64).
GROWTH_CONCURRENCY = 1
GROWTH_BUSY_SHARE = 0.5
GROWTH_RECHECK = 0.05
DEFAULT_TTL = 300.0
DEFAULT_GRACE = 60.0
#: MCP tool names are at most 128 characters; a longer one is never echoed whole.
MAX_TOOL_NAME = 128

UNKNOWN_HANDLE = (
    "unknown session_id: no live session of yours has this id. It may have expired (idle past the TTL), "
    "been destroyed or reinitialized, belonged to an earlier server process (a client that starts a new "
    "server per call, such as LangChain's default stdio setup, loses its sessions with each process), or "
    "belong to other credentials. Create a new session with create_session and pass the session_id it "
    "returns to every call; to keep one connection open, see the README ('Use it from your agent framework')."
)

Request = str | list[str] | Mapping[str, Mapping[str, Any] | None]

_KEEP_CODE_ON_START = (ConfigurationError, ParameterError, PermissionDenied, ResourceUnavailable, ServiceUnavailable)


class Engine:
    """Owns backends, workers and sessions; an async context manager.

    Leaving it destroys every session, waits for pending cleanups, then shuts the
    backends down.
    """

    def __init__(
        self,
        backends: Mapping[str, Backend[Any, Any]],
        *,
        session_ttl: float = DEFAULT_TTL,
        disconnect_grace: float = DEFAULT_GRACE,
        limits: Limits | None = None,
        runtime: Runtime | None = None,
        pools: Mapping[str, int | PoolSize] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        from session.meta_tools import META_TOOLS  # the meta-tools call back into the engine

        self.pool = BackendPool(backends)
        self.session_ttl = session_ttl
        self.disconnect_grace = min(disconnect_grace, session_ttl)
        self.budget = SessionBudget(limits)
        self.runtime = runtime if runtime is not None else Runtime.for_process()
        self.workers: dict[str, Worker] = {}
        self.sessions: dict[str, Session] = {}
        self.catalog: dict[str, ToolSpec] = {**self.pool.catalog(), **{t.name: t for t in META_TOOLS(self)}}
        self._tg: TaskGroup | None = None
        self._stack: AsyncExitStack | None = None
        self._wake_reaper = anyio.Event()
        self._stopping = False
        #: Monotonic seconds for the pools' sizing and back-off (tests pass a clock they drive).
        self.clock: Callable[[], float] = clock if clock is not None else anyio.current_time
        self.warm = {
            name: WarmPool(name, PoolSize.of(size), self.clock)
            for name, size in (pools or {}).items()
            if (size.base if isinstance(size, PoolSize) else size) > 0
        }
        for name in self.warm:
            self.pool.session_backend(name)
        self._wake_refill = anyio.Event()
        #: Sessions starting for callers that wait for them (refill waits while there are many).
        self.cold_starts = 0
        self.refill_defer_above = REFILL_DEFER_ABOVE
        self._refill_waiting = False
        #: Whether the server is too busy to grow a pool now (tests replace it).
        self.server_busy: Callable[[], bool] = CpuShare(GROWTH_BUSY_SHARE, GROWTH_RECHECK).busy

    @property
    def backends(self) -> dict[str, Backend[Any, Any]]:
        return self.pool.backends

    async def warmup(self, resources: list[str] | None = None) -> dict[str, str]:
        return await self.pool.warmup(resources)

    # -- lifetime --------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await anyio.to_thread.run_sync(lambda: self.runtime.scratch_root.mkdir(mode=0o711, exist_ok=True))
        stack = AsyncExitStack()
        await stack.__aenter__()
        self._tg = await stack.enter_async_context(anyio.create_task_group())
        self._tg.start_soon(self._reap_forever, name="session-reaper")
        if self.warm:
            self._tg.start_soon(self._refill_forever, name="warm-pool-refill")
        self._stack = stack
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        await self.shutdown()
        assert self._tg is not None
        assert self._stack is not None
        self._tg.cancel_scope.cancel()
        try:
            return await self._stack.__aexit__(exc_type, exc, tb)
        finally:
            self._tg = None
            # Shared by the engines of one process; the last one out removes it.
            await anyio.to_thread.run_sync(_rmdir_quietly, self.runtime.scratch_root)

    async def shutdown(self) -> None:
        """Refuse new sessions, destroy every session, then shut the backends down.

        Idempotent; leaving the engine calls it. Exposed so a signal handler can clean up
        before a process exits even when its transport cannot be unwound (a thread
        blocked reading stdin).
        """
        self._stopping = True
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for session in list(self.sessions.values()):
                    tg.start_soon(self._destroy, session)
                for pool in self.warm.values():
                    while (member := pool.pop()) is not None:
                        tg.start_soon(self._stop, member)
                    for member in list(pool.retiring):  # a shrink under way: stopped now, not later
                        tg.start_soon(self._stop, member)
            # Members still starting stop themselves once started (they see _stopping), and a
            # shrink's stops finish; wait for that, so their cleanups are counted before the drain.
            with anyio.move_on_after(CLEANUP_TIMEOUT):
                while any(pool.starting or pool.retiring for pool in self.warm.values()):  # noqa: ASYNC110 - bounded, shutdown only
                    await anyio.sleep(0.005)
            self.workers.clear()
            # Cleanups already under way (reaper, disconnects, temporaries) run elsewhere;
            # let them finish before the shared processes they may still use go away.
            with anyio.move_on_after(CLEANUP_TIMEOUT):
                await self.budget.drained()
            await self.pool.shutdown()

    # -- the one entry point for tool calls -------------------------------------------

    async def call(
        self,
        caller: Caller | str | None,
        tool_name: str,
        arguments: Mapping[str, Any] | None,
        *,
        progress: Any = None,
    ) -> CallOutcome:
        """Run one tool call (backend tool or meta-tool); always returns an envelope."""
        caller = Caller.of(caller)
        # Not the event loop's clock: uvloop's ticks in whole milliseconds, cached per loop pass.
        started = time.perf_counter()
        meta = ResultMeta(tool=tool_name[:MAX_TOOL_NAME])
        images: list[Any] = []
        try:
            spec = self.pool.find_tool(tool_name, self.catalog)
            meta.tool, meta.resource_type = spec.name, spec.resource
            arguments = dict(arguments or {})
            handle = arguments.pop("session_id", None) if spec.takes_session else None
            if handle is not None and not isinstance(handle, str):
                raise ParameterError("session_id must be the string create_session returned")
            call = ToolCall(caller, spec, validate_arguments(spec, arguments), meta, progress, handle)
            if spec.owner == "engine":
                data: BaseModel = await spec.handler(self, call)
            else:
                data, images = await self._dispatch(call)
            envelope = success(data, meta)
        except Exception as exc:  # SandboxErrors keep their code; anything else is 5000
            envelope, images = failure(exc, meta), []
        meta.execution_time_ms = round((time.perf_counter() - started) * 1000, 3)
        return CallOutcome.capped(envelope, images)

    call_tool = call

    async def _dispatch(self, call: ToolCall) -> tuple[BaseModel, list[Any]]:
        resource = call.spec.resource
        assert resource is not None
        backend = self.pool.backends[resource]
        if backend.kind() is BackendKind.SHARED:
            await self.pool.ensure_warm(resource)
            ctx = ToolContext(config=backend.session_config(), state=None, **call.progress_kwargs())
            return await invoke(backend, call.spec, ctx, call.args)
        session = self._target(call.caller, resource, call.handle)
        if session is None:
            return await self._run_temporary(call)
        call.meta.session_id = session.session_id
        try:
            return await self._run_in_session(session, call)
        finally:
            call.meta.expires_at = session.expires_at(self.session_ttl)

    def _target(self, caller: Caller, resource: str, handle: str | None) -> Session | None:
        """The session a call runs in: the named one, else the worker's default, else None."""
        if handle is not None:
            session = self.by_handle(caller, handle)
            if session.resource_type != resource:
                raise ParameterError(
                    f"that session_id is a {session.resource_type!r} session; {resource!r} tools need a "
                    f"{resource!r} session"
                )
            return session
        worker = self.workers.get(caller.worker_key) if caller.worker_key else None
        default = worker.sessions.get(resource) if worker else None
        return default if default is not None and default.live else None

    def by_handle(self, caller: Caller, handle: str) -> Session:
        """The live session `handle` names, if the caller's principal may use it; adopts an orphan.

        Raises:
            SessionError: unknown, ended, or another principal's (one and the same answer).
        """
        session = self.sessions.get(handle)
        if session is None or session.principal != caller.principal or not session.live:
            raise SessionError(UNKNOWN_HANDLE)
        if session.grace_until is not None:
            self._adopt(session, caller)
        return session

    def _adopt(self, session: Session, caller: Caller) -> None:
        """A call by handle during a disconnect grace: the caller's worker becomes the owner."""
        session.grace_until = None
        session.owner = caller.worker_key
        if caller.worker_key is not None:
            worker = self.worker(caller)
            current = worker.sessions.get(session.resource_type)
            if current is None or not current.live:
                worker.sessions[session.resource_type] = session
        log.info("session %s adopted after its client disconnected", session.label)

    async def _run_temporary(self, call: ToolCall) -> tuple[BaseModel, list[Any]]:
        """A session private to this one call: created, used, destroyed before returning."""
        resource = call.spec.resource
        assert resource is not None
        session = await self._take_pooled(call.caller, resource, None, temporary=True)
        if session is None:
            session = self._new_session(call.caller, resource, None, temporary=True)
            await self._start(session)
        call.meta.session_id, call.meta.temporary_session = session.session_id, True
        try:
            return await self._run_in_session(session, call)
        finally:
            await self._stop(session)

    @contextmanager
    def _cold_start(self) -> Iterator[None]:
        """Count a start a caller waits for while it runs; the refill resumes when few are left."""
        self.cold_starts += 1
        try:
            yield
        finally:
            self.cold_starts -= 1
            if self._refill_waiting:
                self._wake_refill.set()

    def _refill_deferred(self, pool: WarmPool) -> bool:
        """While more callers wait for starts of their own than the cores and than the pool is
        sized for, a burst beyond the pool has the cores: a refill start would only slow it.
        Below that (steady load the pool serves) refilling is what keeps callers served."""
        return self.cold_starts > max(self.refill_defer_above, pool.target) or self._stopping

    async def _run_in_session(self, session: Session, call: ToolCall) -> tuple[BaseModel, list[Any]]:
        backend = self.pool.backends[session.resource_type]
        label = f"the {session.resource_type!r} session"
        session.active_calls += 1
        try:
            # Each of these awaits would cost an event-loop pass even when it has nothing to
            # wait for (a started session, a free lock): skipped or made free on the hot path.
            if not session.ready.is_set():
                await session.ready.wait()
            async with session.lock:
                if session.status is not SessionStatus.ACTIVE:
                    raise SessionError(f"{label} was destroyed before this call could run")
                problem = await backend.health(session.state) if self.pool.checks_health(backend) else None
                if problem:
                    raise SessionError(
                        f"{label} is broken: {problem}; "
                        f"call reinitialize({session.resource_type!r}) or destroy_session and create it again"
                    )
                assert session.setup is not None
                ctx = ToolContext(
                    config=session.config, state=session.state, session=session.setup, **call.progress_kwargs()
                )
                with anyio.CancelScope() as scope:
                    session.running.add(scope)
                    try:
                        return await invoke(backend, call.spec, ctx, call.args)
                    finally:
                        session.running.discard(scope)
                raise SessionError(f"{label} was destroyed during this call")
        finally:
            session.calls += 1
            session.active_calls -= 1
            session.touch()

    # -- workers ---------------------------------------------------------------------

    def worker(self, caller: Caller) -> Worker:
        key = caller.worker_key
        assert key is not None
        worker = self.workers.get(key)
        if worker is None:
            worker = self.workers[key] = Worker(key)
        return worker

    def disconnect(self, worker_key: str) -> None:
        """A connection-holding client went away: its sessions wait out the grace, then end.

        During the grace a call by handle from the same principal adopts a session.
        """
        if self.workers.pop(worker_key, None) is None:
            return
        deadline = anyio.current_time() + self.disconnect_grace
        for session in self._owned(worker_key):
            session.owner = None
            session.grace_until = deadline
        self._wake_reaper.set()

    def _owned(self, worker_key: str) -> list[Session]:
        """Every live session `worker_key` owns: its defaults and any it adopted beside them."""
        return [s for s in self.sessions.values() if s.owner == worker_key and s.live]

    async def close_worker(self, caller: Caller | str) -> None:
        """Destroy everything a worker owns now and forget it (explicit close)."""
        caller = Caller.of(caller)
        key = caller.worker_key
        if key is None or self.workers.pop(key, None) is None:
            return
        async with anyio.create_task_group() as tg:
            for session in self._owned(key):
                tg.start_soon(self._destroy, session)

    # -- sessions --------------------------------------------------------------------

    def _new_session(
        self,
        caller: Caller,
        resource: str,
        config: Mapping[str, Any] | None,
        *,
        temporary: bool,
        pooled: bool = False,
    ) -> Session:
        backend = self.pool.session_backend(resource)
        requested = dict(config or {})
        name = requested.pop("custom_name", None)
        if name is not None and not isinstance(name, str):
            raise ParameterError("custom_name must be a string")
        backend_config, policy_request = split_policy_request(requested)
        policy = backend.policy.tightened(policy_request)
        if policy.isolation not in backend.isolation_tiers:
            raise ConfigurationError(
                f"{resource!r} sessions cannot run with isolation {policy.isolation!r}; "
                f"this backend supports: {', '.join(sorted(backend.isolation_tiers))}"
            )
        validated = backend.session_config(backend_config)
        if self._stopping:
            raise ServiceUnavailable("the server is shutting down")
        owner = None if temporary or pooled else caller.worker_key
        budget_key = None if pooled else (None if temporary else caller.principal, owner)
        if budget_key is not None:
            self.budget.reserve(resource, *budget_key)
        session = Session(
            session_id=f"tmp-{uuid.uuid4().hex[:12]}" if temporary else new_handle(resource),
            principal=caller.principal,
            owner=owner,
            resource_type=resource,
            name=name,
            config=validated,
            policy=policy,
            temporary=temporary,
        )
        session.budget_key = budget_key
        try:
            session.links = self._links(caller, backend, validated)
        except BaseException:
            if budget_key is not None:
                self.budget.release(resource, *budget_key)
            raise
        return session

    async def _take_pooled(
        self, caller: Caller, resource: str, config: Mapping[str, Any] | None, *, temporary: bool
    ) -> Session | None:
        """A pool member given to `caller`, if the config is the default and the pool has one.

        A ready member is taken at once. With none ready, a member whose start is already
        under way is claimed and waited for: it is ready sooner than a start begun now would
        be. None when neither exists (the caller starts its own session, as without a pool).
        Every such request counts as demand (the pool grows to it); the backend's
        `handed_out` runs before the caller gets the session (its priority is restored).

        Raises: ResourceUnavailable (2004) when a cap refuses the caller (the member stays pooled).
        """
        pool = self.warm.get(resource)
        requested = dict(config or {})
        name = requested.pop("custom_name", None)
        if pool is None or requested or (name is not None and not isinstance(name, str)) or self._stopping:
            return None
        backend = self.pool.backends[resource]
        pool.demand()
        while (session := pool.pop()) is not None:
            if await backend.health(session.state) is None:
                break
            log.warning("pooled %s session %s is broken; starting another", resource, session.label)
            self._spawn(self._stop, session)
        self._wake_refill.set()
        owner = None if temporary else caller.worker_key
        budget_key = (None if temporary else caller.principal, owner)
        if session is None:
            session = pool.claim()
            if session is None:
                pool.misses += 1
                return None
            try:
                self.budget.reserve(resource, *budget_key)
            except BaseException:
                pool.unclaim(session)
                raise
            try:
                await session.ready.wait()
            except BaseException:
                self.budget.release(resource, *budget_key)
                pool.unclaim(session)
                raise
            pool.claimed.discard(session)
            if session.status is not SessionStatus.ACTIVE:
                self.budget.release(resource, *budget_key)
                return None
        else:
            try:
                self.budget.reserve(resource, *budget_key)
            except BaseException:
                pool.put_back(session)
                raise
        pool.taken += 1
        session.budget_key, session.owner, session.principal = budget_key, owner, caller.principal
        session.temporary, session.name = temporary, name
        session.session_id = f"tmp-{uuid.uuid4().hex[:12]}" if temporary else new_handle(resource)
        assert session.setup is not None
        session.setup = dataclasses.replace(
            session.setup, session_id=session.session_id, worker_id=owner or caller.principal
        )
        session.created_at = datetime.now(UTC)
        session.touch()
        # Shielded: a caller cancelled here would leave a taken session nobody tracks.
        with anyio.CancelScope(shield=True):
            try:
                await backend.handed_out(session.state)
            except Exception:  # it still works, only at the pool's background priority
                log.exception("handed_out of pooled %s session %s failed", resource, session.label)
        return session

    def _spawn(self, fn: Any, *args: Any) -> None:
        assert self._tg is not None
        self._tg.start_soon(fn, *args)

    def wake_pools(self) -> None:
        """Have the pools re-read their targets now (tests call it after moving their clock)."""
        self._wake_refill.set()

    async def _refill_forever(self) -> None:
        """Keep every warm pool at its target in the background, a few starts at a time.

        Each missing member starts in its own task (up to the pool's `concurrency`), so a
        burst that empties the pool is made good in about one start's time; a start that
        fails pauses that pool's refill for POOL_RETRY seconds. Members beyond a target that
        fell are stopped, oldest first. Nothing starts or stops while a burst beyond the pool
        keeps the cores busy (see `_refill_deferred`).
        """
        while True:
            self._wake_refill = anyio.Event()
            now = self.clock()
            wake_at = float("inf")
            self._refill_waiting = False
            for pool in self.warm.values():
                change = pool.next_change()
                if change is not None:
                    wake_at = min(wake_at, change)
                if self._refill_deferred(pool):
                    self._refill_waiting = True  # each cold start's end wakes this
                    continue
                surplus = pool.surplus()
                if surplus:
                    log.info("warm pool %s shrinks to %d: stopping %d idle", pool.resource, pool.target, len(surplus))
                    self._spawn(self._retire, pool, surplus)
                if pool.retry_at > now:
                    wake_at = min(wake_at, pool.retry_at)
                    continue
                while pool.missing() and len(pool.starting) < pool.concurrency:
                    if pool.held() >= pool.base:  # growth: never beside busy calls, one at a time
                        if len(pool.starting) >= GROWTH_CONCURRENCY:
                            break
                        if self.server_busy():
                            wake_at = min(wake_at, now + GROWTH_RECHECK)
                            break
                    member = self._new_session(Caller(), pool.resource, None, temporary=False, pooled=True)
                    pool.starting.append(member)
                    self._spawn(self._refill_one, pool, member)
            with anyio.move_on_after(max(wake_at - now, 0.0)):
                await self._wake_refill.wait()

    async def _retire(self, pool: WarmPool, sessions: list[Session]) -> None:
        for session in sessions:
            try:
                await self._stop(session)
            finally:
                pool.retiring.discard(session)

    async def _refill_one(self, pool: WarmPool, member: Session) -> None:
        try:
            await anyio.sleep(BACKGROUND_DELAY)
            if self._refill_deferred(pool):  # a burst came meanwhile: the loop starts it afterwards
                return
            pool.launched.add(member)
            await self._start(member, pooled=True)
        except SandboxError as exc:
            pool.failures += 1
            pool.retry_at = self.clock() + POOL_RETRY
            log.warning("could not start a pooled %s session: %s", pool.resource, exc.message)
            return
        finally:
            pool.starting.remove(member)
            pool.launched.discard(member)
            if not member.ready.is_set():  # cancelled before its start began: nobody may wait on it
                member.status = SessionStatus.CLOSED
                member.ready.set()
            self._wake_refill.set()
        if self._stopping:
            pool.claimed.discard(member)
            await self._stop(member)
        elif member not in pool.claimed:
            pool.ready.append(member)
        # else: the caller that claimed it while it started takes it (see _take_pooled)

    def _links(self, caller: Caller, backend: Backend[Any, Any], config: BaseModel) -> dict[str, dict[str, Any]]:
        links: dict[str, dict[str, Any]] = {}
        for field_name, resource in backend.links.items():
            handle = getattr(config, field_name, None)
            if handle is None:
                continue
            try:
                other = self.by_handle(caller, str(handle))
            except SessionError:
                other = None
            if other is None or other.resource_type != resource or other.status is not SessionStatus.ACTIVE:
                # The value is not echoed: it may be a handle, and handles never appear in messages.
                raise ParameterError(
                    f"{field_name} must be the session_id of one of your live {resource!r} sessions "
                    "(the value given names none)"
                )
            links[field_name] = self.pool.backends[resource].export(other.state)
        return links

    async def _start(self, session: Session, *, pooled: bool = False) -> None:
        """Run `initialize` for a reserved session (no lock held); roll back on failure.

        `pooled`: a warm-pool member, started at the backend's background priority.
        """
        backend = self.pool.backends[session.resource_type]
        try:
            await self.pool.ensure_warm(session.resource_type)
            scratch = self.runtime.scratch_root / session.label
            # One mkdir under a directory that exists: cheaper inline than a worker-thread hop.
            try:
                scratch.mkdir(mode=0o700)
            except FileNotFoundError:  # another engine of this process left last and removed the root
                self.runtime.scratch_root.mkdir(mode=0o711, exist_ok=True)
                scratch.mkdir(mode=0o700)
            session.scratch = scratch
            session.setup = SessionSetup(
                worker_id=session.owner or session.principal,
                session_id=session.session_id,
                label=session.label,
                resource=session.resource_type,
                config=session.config,
                policy=session.policy,
                scratch=scratch,
                links=session.links,
                pooled=pooled,
            )
            with nullcontext() if pooled else self._cold_start():
                session.state = await backend.initialize(session.setup)
        except BaseException as exc:
            session.status = SessionStatus.CLOSED
            session.failure = str(exc)
            session.ready.set()
            await self._release(session)
            if isinstance(exc, _KEEP_CODE_ON_START):
                # What the caller or operator must change (a tier the host lacks, a limit, a
                # bad value) keeps its own code; anything else means the session is broken.
                raise type(exc)(f"could not start {session.resource_type!r}: {exc.message}", data=exc.data) from exc
            if isinstance(exc, SandboxError):
                raise SessionError(f"could not start {session.resource_type!r}: {exc.message}") from exc
            if isinstance(exc, Exception):
                log.exception("initialize of %s failed", session.label)
                raise SessionError(f"could not start {session.resource_type!r}: {type(exc).__name__}: {exc}") from exc
            raise
        session.status = SessionStatus.ACTIVE
        session.touch()
        session.ready.set()

    def _release_budget(self, session: Session) -> None:
        if session.budget_key is not None:
            self.budget.release(session.resource_type, *session.budget_key)
            session.budget_key = None

    async def _release(self, session: Session) -> None:
        self._release_budget(session)
        scratch, session.scratch = session.scratch, None
        if scratch is not None and not _remove_shallow(scratch):
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(shutil.rmtree, scratch, True)

    async def _stop(self, session: Session) -> None:
        """End a session once: kill first, then clean up; shielded, bounded, logged, never raises.

        A backend that kills its session at once (`Backend.kill`: every process SIGKILLed)
        has its `cleanup` (reaping, removing cgroups, mounts and files) run in the
        background: the caller (a destroy, a temporary call) gets its answer as soon as
        nothing of the session runs any more. Background cleanups are counted in the budget,
        so shutdown waits for them. A backend that cannot is cleaned up before this returns.
        """
        if session.status in (SessionStatus.CLOSING, SessionStatus.CLOSED):
            return
        session.status = SessionStatus.CLOSING
        for scope in list(session.running):
            scope.cancel()
        backend = self.pool.backends[session.resource_type]
        killed = False
        with anyio.CancelScope(shield=True):
            if session.setup is not None and self._tg is not None:
                try:
                    with anyio.fail_after(CLEANUP_TIMEOUT):
                        killed = await backend.kill(session.setup, session.state)
                except Exception:
                    log.exception("kill of %s failed", session.label)
            if not killed:
                await self._cleanup(session)
                return
            self._release_budget(session)
            self.budget.cleanup_started()
            assert self._tg is not None
            self._tg.start_soon(self._cleanup, session, True, name=f"cleanup {session.label}")

    async def _cleanup(self, session: Session, counted: bool = False) -> None:
        """Run `cleanup` for a session whose stop began; `counted`: a background cleanup."""
        with anyio.CancelScope(shield=True):
            if counted:
                await anyio.sleep(BACKGROUND_DELAY)
            try:
                with anyio.fail_after(CLEANUP_TIMEOUT):
                    async with session.lock:
                        assert session.setup is not None
                        await self.pool.backends[session.resource_type].cleanup(session.setup, session.state)
            except Exception:
                log.exception("cleanup of %s failed", session.label)
            finally:
                session.status = SessionStatus.CLOSED
                await self._release(session)
                if counted:
                    self.budget.cleanup_finished()

    def _forget(self, session: Session) -> None:
        """Unlink a session from the handle table and from its owner's defaults."""
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]
        worker = self.workers.get(session.owner) if session.owner else None
        if worker is not None and worker.sessions.get(session.resource_type) is session:
            del worker.sessions[session.resource_type]

    async def _destroy(self, session: Session) -> None:
        self._forget(session)
        await session.ready.wait()
        await self._stop(session)

    async def create_sessions(
        self, caller: Caller | str, request: Request, config: Mapping[str, Any] | None = None
    ) -> list[tuple[SessionView, bool]]:
        """Create one or several sessions; all or nothing.

        Returns (view, created) pairs; `created` is False where the worker already had a
        session of that resource (it is kept). A caller without a worker gets sessions
        reachable by handle only.
        """
        caller = Caller.of(caller)
        wanted = normalise_request(request, config)
        worker = self.worker(caller) if caller.worker_key else None
        fresh: list[Session] = []
        taken: list[Session] = []
        results: list[tuple[Session, bool]] = []
        try:
            for resource, cfg in wanted.items():
                existing = worker.sessions.get(resource) if worker else None
                if existing is not None and existing.live:
                    results.append((existing, False))
                    existing.active_calls += 1
                    continue
                pooled = await self._take_pooled(caller, resource, cfg, temporary=False)
                session = pooled or self._new_session(caller, resource, cfg, temporary=False)
                self.sessions[session.session_id] = session
                if worker is not None:
                    worker.sessions[resource] = session
                if pooled is None:
                    fresh.append(session)
                else:
                    taken.append(session)
                results.append((session, True))
                # Held like a running call, so a slow sibling's start can't let the TTL reap it.
                session.active_calls += 1
            async with anyio.create_task_group() as tg:
                for session in fresh:
                    tg.start_soon(self._start_published, session)
            for session, _ in results:
                await session.ready.wait()
                if session.status is not SessionStatus.ACTIVE:
                    if session.start_error is not None:
                        raise session.start_error
                    raise SessionError(session.failure or f"the {session.resource_type!r} session was destroyed")
        except BaseException:
            with anyio.CancelScope(shield=True):
                for session in fresh + taken:
                    self._forget(session)
                    if session.status is SessionStatus.ACTIVE:
                        await self._stop(session)
            raise
        finally:
            for session, _ in results:
                session.active_calls -= 1
                session.touch()
        self._wake_reaper.set()
        return [(s.view(self.session_ttl), created) for s, created in results]

    async def _start_published(self, session: Session) -> None:
        """Start one of several sessions; a failure is recorded on it (the caller reports it)."""
        try:
            await self._start(session)
        except SandboxError as exc:
            session.failure, session.start_error = exc.message, exc
            self._forget(session)

    def _select(self, caller: Caller, resources: list[str] | None, handle: str | None) -> list[Session]:
        """The sessions a destroy/refresh names: by handle, by resource (the worker's), or all the worker's."""
        if handle is not None:
            session = self.by_handle(caller, handle)
            if resources and session.resource_type not in resources:
                raise ParameterError(f"that session_id is a {session.resource_type!r} session")
            return [session]
        worker = self.workers.get(caller.worker_key) if caller.worker_key else None
        if resources is None:
            return self._owned(worker.key) if worker else []
        found = []
        for resource in dict.fromkeys(resources):
            self.pool.backend(resource)
            default = worker.sessions.get(resource) if worker else None
            if default is None or not default.live:
                have = ", ".join(sorted(worker.sessions)) if worker and worker.sessions else "none"
                raise SessionError(
                    f"you have no {resource!r} session to use without a session_id (your sessions: {have}); "
                    f"create one with create_session({resource!r}), or pass the session_id you were given"
                )
            found.append(default)
        return found

    async def destroy_sessions(
        self, caller: Caller | str, resources: list[str] | None = None, *, session_id: str | None = None
    ) -> list[SessionView]:
        """Destroy the named sessions, or all of the worker's; each cleanup runs concurrently."""
        targets = self._select(Caller.of(caller), resources, session_id)
        views = [s.view(self.session_ttl) for s in targets]
        async with anyio.create_task_group() as tg:
            for session in targets:
                tg.start_soon(self._destroy, session)
        for view in views:
            view.status = SessionStatus.CLOSED.value
        return views

    async def reinitialize(
        self,
        caller: Caller | str,
        resource: str | None,
        new_config: Mapping[str, Any] | None,
        *,
        session_id: str | None = None,
    ) -> dict[str, Any]:
        """Replace one session with a fresh one built from `new_config`; others untouched.

        The new session is started first, so a config that fails leaves the old one
        working. The old handle ends; the result carries the new one.
        """
        caller = Caller.of(caller)
        old: Session | None
        if session_id is not None:
            old = self.by_handle(caller, session_id)
            if resource is not None and resource != old.resource_type:
                raise ParameterError(f"that session_id is a {old.resource_type!r} session, not {resource!r}")
            resource = old.resource_type
        else:
            if resource is None:
                raise ParameterError("reinitialize needs resource (e.g. 'bash') or session_id")
            self.pool.session_backend(resource)
            worker = self.workers.get(caller.worker_key) if caller.worker_key else None
            old = worker.sessions.get(resource) if worker else None
            old = old if old is not None and old.live else None
        cfg = dict(new_config or {})
        if old is not None and "custom_name" not in cfg and old.name is not None:
            cfg["custom_name"] = old.name
        # The replacement belongs to whoever owned the old session (nobody: reachable by handle only).
        owner = caller if old is None else Caller(old.principal, old.owner.partition("/")[2] if old.owner else None)
        new = self._new_session(owner, resource, cfg, temporary=False)
        await self._start(new)
        worker = self.workers.get(new.owner) if new.owner else None
        if new.owner is not None and worker is None:
            await self._stop(new)
            raise SessionError("the client disconnected while reinitializing")
        self.sessions[new.session_id] = new
        if worker is not None:
            worker.sessions[resource] = new
        if old is not None:
            await self._destroy(old)
        self._wake_reaper.set()
        return {
            "status": "success",
            "old_session_id": old.session_id if old else None,
            "new_session_id": new.session_id,
            "session_id": new.session_id,
            "config_applied": dict(new_config or {}),
            "session": new.view(self.session_ttl).model_dump(),
        }

    # -- listing and refreshing (read-only calls do not refresh) ---------------------

    def list_sessions(
        self, caller: Caller | str, *, details: bool = False, everything: bool = False
    ) -> list[SessionView]:
        """The worker's sessions (or, with `everything`, every session of its principal)."""
        caller = Caller.of(caller)
        if everything:
            chosen = [s for s in self.sessions.values() if s.principal == caller.principal and s.live]
        else:
            worker = self.workers.get(caller.worker_key) if caller.worker_key else None
            chosen = [s for s in worker.sessions.values() if s.live] if worker else []
        return [s.view(self.session_ttl, self._describe(s) if details else None) for s in chosen]

    def _describe(self, session: Session) -> dict[str, Any]:
        if session.status is not SessionStatus.ACTIVE:
            return {}
        try:
            return self.pool.backends[session.resource_type].describe(session.state)
        except Exception:
            log.exception("describe of %s failed", session.label)
            return {}

    def refresh_sessions(
        self, caller: Caller | str, resource: str | None = None, *, session_id: str | None = None
    ) -> list[SessionView]:
        targets = self._select(Caller.of(caller), [resource] if resource else None, session_id)
        for session in targets:
            session.touch()
        return [s.view(self.session_ttl) for s in targets]

    def status(self, caller: Caller | str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": "stopping" if self._stopping else "running",
            "session_ttl": self.session_ttl,
            "disconnect_grace": self.disconnect_grace,
            "workers": len(self.workers),
            "live_sessions": self.budget.live,
            "backends": self.pool.describe(self.budget.by_resource),
        }
        if self.warm:
            out["warm_pools"] = {name: pool.describe() for name, pool in self.warm.items()}
        if caller is not None:
            caller = Caller.of(caller)
            out["your_sessions"] = [v.model_dump() for v in self.list_sessions(caller)]
        return out

    # -- TTL reaper ------------------------------------------------------------------

    async def _reap_forever(self) -> None:
        """Destroy sessions idle past the TTL or past a disconnect grace; sleeps until the next deadline."""
        while True:
            expired, next_deadline = collect_expired(
                list(self.sessions.values()), self.session_ttl, anyio.current_time()
            )
            for session in expired:
                why = "its client's disconnect grace ended" if session.grace_until is not None else "idle past TTL"
                log.info("session %s ends: %s", session.label, why)
                self._forget(session)
                assert self._tg is not None
                self._tg.start_soon(self._stop, session)
            self._wake_reaper = anyio.Event()
            # Deadlines only move later (calls refresh them), so sleeping until the earliest
            # one is exact; the 1 s cap covers calls that end meanwhile.
            delay = min(max(next_deadline - anyio.current_time(), 0.01), 1.0)
            with anyio.move_on_after(delay):
                await self._wake_reaper.wait()


#: Largest file `_remove_shallow` unlinks on the event loop.
SHALLOW_FILE_BYTES = 1 << 20


def _remove_shallow(directory: Path, most: int = 8) -> bool:
    """Remove `directory` here and now if it holds at most `most` entries, none of them a
    non-empty directory or a file over SHALLOW_FILE_BYTES (a sandboxed shell's scratch: its
    emptied home); False (nothing or part removed) otherwise, for a tree walk in a worker
    thread. A worker-thread hop costs more than these few calls: GIL handoffs with the busy
    loop (see SessionSandbox._quick_setup)."""
    try:
        with os.scandir(directory) as scan:
            entries = list(itertools.islice(scan, most + 1))
        if len(entries) > most:
            return False
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                os.rmdir(entry.path)
            elif entry.is_symlink() or entry.stat(follow_symlinks=False).st_size <= SHALLOW_FILE_BYTES:
                os.unlink(entry.path)
            else:
                return False  # freeing a large file's blocks: the tree walk, in a thread
        os.rmdir(directory)
    except FileNotFoundError:
        return not directory.exists()
    except OSError:
        return False
    return True


def _rmdir_quietly(path: Any) -> None:
    with suppress(OSError):
        path.rmdir()


class CpuShare:
    """Whether this process used more than `share` of one core since the last look.

    Looks closer together than `every` seconds repeat the last answer, so a burst of refill
    decisions reads the clocks once. The first look after a long idle spell averages over that
    spell (at most one growth start slips through before a busy moment is seen).
    """

    def __init__(self, share: float, every: float) -> None:
        self.share, self.every = share, every
        self._at, self._cpu = time.monotonic(), time.process_time()
        self._busy = False

    def busy(self) -> bool:
        now = time.monotonic()
        if now - self._at >= self.every:
            cpu = time.process_time()
            self._busy = (cpu - self._cpu) / (now - self._at) > self.share
            self._at, self._cpu = now, cpu
        return self._busy
