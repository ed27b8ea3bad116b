"""The session engine: workers, explicit and temporary sessions, TTL reaping, calls.

Locking discipline (the original server's global lock across backend I/O is what this
avoids): registry changes happen between awaits, so they need no lock at all. A new
session reserves its slot in state CREATING, `initialize` runs with no lock held, and
the slot is published or rolled back. Calls on one session queue on that session's
FIFO lock; calls on different sessions never wait for each other.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup
from pydantic import BaseModel, ValidationError

from backends.base import Backend, BackendKind, Image, ProgressFn, ToolContext, ToolSpec
from session.backend_pool import BackendPool
from session.budget import Limits, SessionBudget
from session.envelope import ResultMeta, failure, success
from session.errors import (
    ParameterError,
    SandboxError,
    ServiceUnavailable,
    SessionError,
)
from session.models import Session, SessionStatus, SessionView, Worker
from session.reaper import collect_expired
from session.tool_calls import CallOutcome, invoke, normalise_request, validate_arguments
from session.validation import describe_validation_error

log = logging.getLogger(__name__)

CLEANUP_TIMEOUT = 30.0
DEFAULT_TTL = 300.0


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
        limits: Limits | None = None,
    ) -> None:
        self.pool = BackendPool(backends)
        self.session_ttl = session_ttl
        self.budget = SessionBudget(limits)
        self.workers: dict[str, Worker] = {}
        self._tg: TaskGroup | None = None
        self._stack: AsyncExitStack | None = None
        self._wake_reaper = anyio.Event()
        self._stopping = False

    @property
    def backends(self) -> dict[str, Backend[Any, Any]]:
        return self.pool.backends

    async def warmup(self, resources: list[str] | None = None) -> dict[str, str]:
        return await self.pool.warmup(resources)

    # -- lifetime --------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        stack = AsyncExitStack()
        await stack.__aenter__()
        self._tg = await stack.enter_async_context(anyio.create_task_group())
        self._tg.start_soon(self._reap_forever, name="session-reaper")
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

    async def shutdown(self) -> None:
        """Refuse new sessions, destroy every session, then shut the backends down.

        Idempotent; leaving the engine calls it. Exposed so a signal handler can clean up
        before a process exits even when its transport cannot be unwound (a thread
        blocked reading stdin).
        """
        self._stopping = True
        with anyio.CancelScope(shield=True):
            await self._destroy_everything()
            # Cleanups already under way (reaper, disconnects) run in the task group; let
            # them finish before the shared processes they may still use go away.
            with anyio.move_on_after(CLEANUP_TIMEOUT):
                await self.budget.drained()
            await self.pool.shutdown()

    async def _destroy_everything(self) -> None:
        async with anyio.create_task_group() as tg:
            for worker in list(self.workers.values()):
                tg.start_soon(self.close_worker, worker.worker_id)

    def worker(self, worker_id: str) -> Worker:
        worker = self.workers.get(worker_id)
        if worker is None:
            worker = self.workers[worker_id] = Worker(worker_id)
        return worker

    def _live_session(self, worker_id: str, resource: str) -> Session:
        worker = self.workers.get(worker_id)
        session = worker.sessions.get(resource) if worker else None
        if session is None:
            have = ", ".join(sorted(worker.sessions)) if worker and worker.sessions else "none"
            raise SessionError(
                f"this worker has no {resource!r} session (its sessions: {have}); "
                f"create one with create_session({resource!r})"
            )
        return session

    def _new_session(
        self, worker_id: str, resource: str, config: Mapping[str, Any] | None, *, temporary: bool
    ) -> Session:
        backend = self.pool.session_backend(resource)
        requested = dict(config or {})
        name = requested.pop("custom_name", None)
        if name is not None and not isinstance(name, str):
            raise ParameterError("custom_name must be a string")
        try:
            validated = backend.session_config(requested)
        except ValidationError as exc:
            raise ParameterError(
                describe_validation_error(exc, f"config of {resource!r}"),
                data={"config_schema": backend.Config.model_json_schema()},
            ) from None
        if self._stopping:
            raise ServiceUnavailable("the server is shutting down")
        self.budget.reserve(resource)
        prefix = "tmp" if temporary else resource
        return Session(
            session_id=f"{prefix}-{uuid.uuid4().hex[:12]}",
            worker_id=worker_id,
            resource_type=resource,
            name=name,
            config=validated,
            temporary=temporary,
        )

    async def _start(self, session: Session) -> None:
        """Run `initialize` for a reserved session (no lock held); roll back on failure."""
        backend = self.pool.backends[session.resource_type]
        try:
            await self.pool.ensure_warm(session.resource_type)
            session.state = await backend.initialize(session.worker_id, session.config)
        except BaseException as exc:
            session.status = SessionStatus.CLOSED
            session.failure = str(exc)
            session.ready.set()
            self.budget.release(session.resource_type)
            if isinstance(exc, SandboxError):
                raise SessionError(f"could not start {session.resource_type!r}: {exc.message}") from exc
            if isinstance(exc, Exception):
                log.exception("initialize of %s failed", session.resource_type)
                raise SessionError(f"could not start {session.resource_type!r}: {type(exc).__name__}: {exc}") from exc
            raise
        session.status = SessionStatus.ACTIVE
        session.touch()
        session.ready.set()

    async def _stop(self, session: Session) -> None:
        """Run `cleanup` for a session once; shielded, bounded, logged, never raises."""
        if session.status in (SessionStatus.CLOSING, SessionStatus.CLOSED):
            return
        session.status = SessionStatus.CLOSING
        for scope in list(session.running):
            scope.cancel()
        with anyio.CancelScope(shield=True):
            try:
                with anyio.fail_after(CLEANUP_TIMEOUT):
                    async with session.lock:
                        await self.pool.backends[session.resource_type].cleanup(session.worker_id, session)
            except Exception:
                log.exception("cleanup of %s session %s failed", session.resource_type, session.session_id)
            finally:
                session.status = SessionStatus.CLOSED
                self.budget.release(session.resource_type)

    async def create_sessions(
        self,
        worker_id: str,
        request: str | list[str] | Mapping[str, Mapping[str, Any] | None],
        config: Mapping[str, Any] | None = None,
    ) -> list[tuple[SessionView, bool]]:
        """Create one or several sessions; all or nothing.

        Returns (view, created) pairs; `created` is False for a session that existed.
        """
        wanted = normalise_request(request, config)
        worker = self.worker(worker_id)
        fresh: list[Session] = []
        results: list[tuple[Session, bool]] = []
        try:
            for resource, cfg in wanted.items():
                existing = worker.sessions.get(resource)
                if existing is not None and existing.status in (SessionStatus.CREATING, SessionStatus.ACTIVE):
                    results.append((existing, False))
                else:
                    session = self._new_session(worker_id, resource, cfg, temporary=False)
                    worker.sessions[resource] = session
                    fresh.append(session)
                    results.append((session, True))
                # Held like a running call, so a slow sibling's start can't let the TTL reap it.
                results[-1][0].active_calls += 1
            async with anyio.create_task_group() as tg:
                for session in fresh:
                    tg.start_soon(self._start_published, worker, session)
            for session, _ in results:
                await session.ready.wait()
                if session.status is not SessionStatus.ACTIVE:
                    raise SessionError(session.failure or f"the {session.resource_type!r} session was destroyed")
        except BaseException:
            with anyio.CancelScope(shield=True):
                for session in fresh:
                    if worker.sessions.get(session.resource_type) is session:
                        del worker.sessions[session.resource_type]
                    if session.status is SessionStatus.ACTIVE:
                        await self._stop(session)
            raise
        finally:
            for session, _ in results:
                session.active_calls -= 1
                session.touch()
        self._wake_reaper.set()
        return [(s.view(self.session_ttl), created) for s, created in results]

    async def _start_published(self, worker: Worker, session: Session) -> None:
        """Start one of several sessions; a failure is recorded on it (the caller reports it)."""
        try:
            await self._start(session)
        except SessionError as exc:
            session.failure = exc.message
            if worker.sessions.get(session.resource_type) is session:
                del worker.sessions[session.resource_type]

    async def destroy_sessions(self, worker_id: str, resources: list[str] | None = None) -> list[SessionView]:
        """Destroy the named sessions, or all of the worker's; each cleanup runs concurrently."""
        worker = self.workers.get(worker_id)
        if resources is None:
            targets = list(worker.sessions.values()) if worker else []
        else:
            for resource in resources:
                self.pool.backend(resource)
            targets = [self._live_session(worker_id, r) for r in dict.fromkeys(resources)]
        views = [s.view(self.session_ttl) for s in targets]
        if worker is not None:
            for session in targets:
                if worker.sessions.get(session.resource_type) is session:
                    del worker.sessions[session.resource_type]
        async with anyio.create_task_group() as tg:
            for session in targets:
                tg.start_soon(self._stop_when_started, session)
        for view in views:
            view.status = SessionStatus.CLOSED.value
        return views

    async def _stop_when_started(self, session: Session) -> None:
        await session.ready.wait()
        await self._stop(session)

    async def close_worker(self, worker_id: str) -> None:
        """The worker went away (disconnect): destroy all it holds and forget it."""
        worker = self._detach_worker(worker_id)
        if worker is not None:
            await self._stop_all(worker)

    def close_worker_soon(self, worker_id: str) -> None:
        """Forget the worker now; destroy its sessions on the engine's task group.

        For disconnect hooks, which the SDK bounds in time: a request naming the same
        worker meanwhile starts afresh instead of reaching sessions being destroyed.
        """
        worker = self._detach_worker(worker_id)
        if worker is not None and self._tg is not None:
            self._tg.start_soon(self._stop_all, worker)

    def _detach_worker(self, worker_id: str) -> Worker | None:
        worker = self.workers.pop(worker_id, None)
        if worker is not None:
            worker.closed = True
        return worker

    async def _stop_all(self, worker: Worker) -> None:
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for session in list(worker.sessions.values()):
                    tg.start_soon(self._stop_when_started, session)
            worker.sessions.clear()

    async def reinitialize(self, worker_id: str, resource: str, new_config: Mapping[str, Any] | None) -> dict[str, Any]:
        """Replace one session with a fresh one built from `new_config`; others untouched.

        The new session is started first, so a config that fails leaves the old one
        working.
        """
        self.pool.session_backend(resource)
        worker = self.worker(worker_id)
        old = worker.sessions.get(resource)
        cfg = dict(new_config or {})
        if old is not None and "custom_name" not in cfg and old.name is not None:
            cfg["custom_name"] = old.name
        new = self._new_session(worker_id, resource, cfg, temporary=False)
        await self._start(new)
        if worker.closed:
            await self._stop(new)
            raise SessionError("the worker disconnected while reinitializing")
        worker = self.worker(worker_id)
        old = worker.sessions.get(resource, old)
        worker.sessions[resource] = new
        if old is not None and old is not new:
            await old.ready.wait()
            await self._stop(old)
        self._wake_reaper.set()
        applied = dict(new_config or {})
        return {
            "status": "success",
            "old_session_id": old.session_id if old else None,
            "new_session_id": new.session_id,
            "config_applied": applied,
            "session": new.view(self.session_ttl).model_dump(),
        }

    # -- listing and refreshing (read-only calls do not refresh) ---------------------

    def list_sessions(self, worker_id: str, *, details: bool = False) -> list[SessionView]:
        """The worker's sessions; `details` adds what each holds (processes, display, ...)."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return []
        return [s.view(self.session_ttl, self._describe(s) if details else None) for s in worker.sessions.values()]

    def _describe(self, session: Session) -> dict[str, Any]:
        if session.status is not SessionStatus.ACTIVE:
            return {}
        try:
            return self.pool.backends[session.resource_type].describe(session.state)
        except Exception:
            log.exception("describe of %s session %s failed", session.resource_type, session.session_id)
            return {}

    def refresh_sessions(self, worker_id: str, resource: str | None = None) -> list[SessionView]:
        if resource is None:
            worker = self.workers.get(worker_id)
            targets = list(worker.sessions.values()) if worker else []
        else:
            self.pool.backend(resource)
            targets = [self._live_session(worker_id, resource)]
        for session in targets:
            session.touch()
        return [s.view(self.session_ttl) for s in targets]

    def status(self, worker_id: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": "stopping" if self._stopping else "running",
            "session_ttl": self.session_ttl,
            "workers": len(self.workers),
            "live_sessions": self.budget.live,
            "backends": self.pool.describe(self.budget.by_resource),
        }
        if worker_id is not None:
            out["worker_id"] = worker_id
            out["your_sessions"] = [v.model_dump() for v in self.list_sessions(worker_id)]
        return out

    # -- tool calls ------------------------------------------------------------------

    async def call_tool(
        self,
        worker_id: str,
        tool_name: str,
        arguments: Mapping[str, Any] | None,
        *,
        progress: ProgressFn | None = None,
    ) -> CallOutcome:
        """Run one tool call and always return an envelope (never raises a SandboxError)."""
        started = anyio.current_time()
        meta = ResultMeta(tool=tool_name)
        try:
            resource, spec = self.pool.find_tool(tool_name)
            meta.tool, meta.resource_type = spec.name, resource
            call = _Call(worker_id, resource, spec, validate_arguments(spec, arguments), meta, progress)
            data, images = await self._dispatch(call)
            envelope = success(data, meta)
        except Exception as exc:  # SandboxErrors keep their code; anything else is 5000
            envelope, images = failure(exc, meta), []
        meta.execution_time_ms = round((anyio.current_time() - started) * 1000, 3)
        return CallOutcome(envelope, images)

    async def _dispatch(self, call: _Call) -> tuple[dict[str, Any], list[Image]]:
        backend = self.pool.backends[call.resource]
        if backend.kind() is BackendKind.SHARED:
            await self.pool.ensure_warm(call.resource)
            ctx = ToolContext(worker_id=call.worker_id, session_id=None, state=None, **call.progress_kwargs())
            return await invoke(backend, call.spec, ctx, call.args)
        worker = self.workers.get(call.worker_id)
        session = worker.sessions.get(call.resource) if worker else None
        if session is not None and session.status in (SessionStatus.CREATING, SessionStatus.ACTIVE):
            call.meta.session_id = session.session_id
            try:
                return await self._run_in_session(session, call)
            finally:
                call.meta.expires_at = session.expires_at(self.session_ttl)
        return await self._run_temporary(call)

    async def _run_temporary(self, call: _Call) -> tuple[dict[str, Any], list[Image]]:
        """A session private to this one call: created, used, destroyed before returning."""
        session = self._new_session(call.worker_id, call.resource, None, temporary=True)
        call.meta.session_id, call.meta.temporary_session = session.session_id, True
        await self._start(session)
        try:
            return await self._run_in_session(session, call)
        finally:
            await self._stop(session)

    async def _run_in_session(self, session: Session, call: _Call) -> tuple[dict[str, Any], list[Image]]:
        backend = self.pool.backends[session.resource_type]
        label = f"the {session.resource_type!r} session {session.session_id}"
        session.active_calls += 1
        try:
            await session.ready.wait()
            async with session.lock:
                if session.status is not SessionStatus.ACTIVE:
                    raise SessionError(f"{label} was destroyed before this call could run")
                problem = await backend.health(session.state)
                if problem:
                    raise SessionError(
                        f"{label} is broken: {problem}; "
                        f"call reinitialize({session.resource_type!r}) or destroy_session and create it again"
                    )
                ctx = ToolContext(
                    worker_id=session.worker_id,
                    session_id=session.session_id,
                    state=session.state,
                    config=session.config,
                    **call.progress_kwargs(),
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

    # -- TTL reaper ------------------------------------------------------------------

    async def _reap_forever(self) -> None:
        """Destroy sessions idle longer than the TTL; sleeps until the next deadline."""
        while True:
            expired, next_deadline = collect_expired(self.workers, self.session_ttl, anyio.current_time())
            for session in expired:
                log.info(
                    "session %s (%s) expired after %gs idle",
                    session.session_id,
                    session.resource_type,
                    self.session_ttl,
                )
                assert self._tg is not None
                self._tg.start_soon(self._stop, session)
            self._wake_reaper = anyio.Event()
            # Deadlines only move later (calls refresh them), so sleeping until the earliest
            # one is exact; the 1 s cap covers calls that end meanwhile.
            delay = min(max(next_deadline - anyio.current_time(), 0.01), 1.0)
            with anyio.move_on_after(delay):
                await self._wake_reaper.wait()


@dataclass(slots=True)
class _Call:
    """One tool call on its way to a session."""

    worker_id: str
    resource: str
    spec: ToolSpec
    args: BaseModel
    meta: ResultMeta
    progress: ProgressFn | None

    def progress_kwargs(self) -> dict[str, Any]:
        return {"progress": self.progress} if self.progress is not None else {}
