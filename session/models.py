"""Callers, workers and sessions as typed records; the engine owns and mutates them."""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel

from backends.base import SessionSetup
from backends.policy import Policy
from session.envelope import utc_iso

#: The principal of in-process and stdio callers: whoever started the server.
LOCAL_PRINCIPAL = "local"


class SessionStatus(enum.StrEnum):
    CREATING = "creating"
    ACTIVE = "active"
    CLOSING = "closing"
    CLOSED = "closed"


def wall_clock_at(monotonic_deadline: float) -> datetime:
    """Convert an `anyio.current_time()` deadline to a UTC wall-clock time."""
    return datetime.now(UTC) + timedelta(seconds=monotonic_deadline - anyio.current_time())


def new_handle(resource: str) -> str:
    """A session handle: an unguessable capability (128 random bits), readable prefix."""
    return f"{resource}-{secrets.token_urlsafe(16)}"



@dataclass(frozen=True, slots=True)
class Caller:
    """Who makes a call: the principal (a token's name; `local` on stdio and in-process)
    and the worker within it (None when nothing identifies the caller beyond the request)."""

    principal: str = LOCAL_PRINCIPAL
    worker: str | None = None

    @classmethod
    def of(cls, caller: Caller | str | None) -> Caller:
        if isinstance(caller, Caller):
            return caller
        return cls(worker=caller)

    @property
    def worker_key(self) -> str | None:
        """The engine's key of this caller's worker: principals never share workers."""
        return f"{self.principal}/{self.worker}" if self.worker is not None else None


@dataclass(eq=False)
class Session:
    """One live resource instance.

    Calls take `lock` (FIFO) so they run one at a time in arrival order; `active_calls`
    counts calls waiting or running, and a session with any is never reaped. `owner` is
    the worker key whose calls without `session_id` use it (None: reachable by handle only);
    `grace_until` is set while a disconnected owner's session waits to be adopted.
    """

    session_id: str
    principal: str
    owner: str | None
    resource_type: str
    name: str | None
    config: BaseModel
    policy: Policy
    temporary: bool = False
    state: Any = None
    status: SessionStatus = SessionStatus.CREATING
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    last_used: float = field(default_factory=anyio.current_time)
    active_calls: int = 0
    calls: int = 0
    ready: anyio.Event = field(default_factory=anyio.Event)
    # FIFO as any anyio lock; `fast_acquire` skips the event-loop pass of an uncontended acquire.
    lock: anyio.Lock = field(default_factory=lambda: anyio.Lock(fast_acquire=True))
    running: set[anyio.CancelScope] = field(default_factory=set)
    failure: str | None = None
    start_error: Exception | None = None
    grace_until: float | None = None
    setup: SessionSetup[Any] | None = None
    scratch: Path | None = None
    links: dict[str, dict[str, Any]] = field(default_factory=dict)
    budget_key: tuple[str | None, str | None] | None = (None, None)
    """(principal, worker) the session is counted against (released with the same); None
    for a warm-pool member, which counts against no cap until it is taken."""
    label: str = ""
    """Loggable, path-safe name (resource and random hex), independent of the handle, so a
    pooled session keeps it when it is given a handle."""

    def __post_init__(self) -> None:
        if not self.label:
            self.label = f"{self.resource_type}-{secrets.token_hex(5)}"

    @property
    def live(self) -> bool:
        return self.status in (SessionStatus.CREATING, SessionStatus.ACTIVE)

    def touch(self) -> None:
        self.last_used = anyio.current_time()

    def deadline(self, ttl: float) -> float | None:
        """Monotonic time at which this session ends unless used; None while calls are in flight."""
        if self.temporary or self.active_calls:
            return None
        idle = self.last_used + ttl
        return min(idle, self.grace_until) if self.grace_until is not None else idle

    def expires_at(self, ttl: float) -> datetime | None:
        if self.temporary:
            return None
        return wall_clock_at(self.deadline(ttl) or anyio.current_time() + ttl)

    def view(self, ttl: float, details: dict[str, Any] | None = None) -> SessionView:
        expires = self.expires_at(ttl)
        return SessionView(
            resource_type=self.resource_type,
            session_id=self.session_id,
            status=self.status.value,
            session_name=self.name,
            created_at=utc_iso(self.created_at),
            expires_at=utc_iso(expires) if expires else None,
            ttl_seconds=ttl,
            busy=self.active_calls > 0,
            calls=self.calls,
            config=self.config.model_dump(mode="json"),
            policy=self.policy.model_dump(mode="json"),
            orphaned=self.grace_until is not None,
            details=details or {},
        )


class SessionView(BaseModel):
    """A session as `list_sessions` and `create_session` show it."""

    resource_type: str
    session_id: str
    status: str
    session_name: str | None
    created_at: str
    expires_at: str | None
    ttl_seconds: float
    busy: bool
    calls: int
    config: dict[str, Any]
    policy: dict[str, Any] = {}
    orphaned: bool = False
    details: dict[str, Any] = {}


@dataclass(eq=False)
class Worker:
    """Whoever owns sessions: one MCP connection, one `Sandbox` client, one worker key.

    `sessions` holds its default session per resource (the one calls without
    `session_id` use).
    """

    key: str
    sessions: dict[str, Session] = field(default_factory=dict)
