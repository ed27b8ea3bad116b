"""Sessions and workers as typed records; the engine owns and mutates them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from pydantic import BaseModel

from session.envelope import utc_iso


class SessionStatus(enum.StrEnum):
    CREATING = "creating"
    ACTIVE = "active"
    CLOSING = "closing"
    CLOSED = "closed"


def wall_clock_at(monotonic_deadline: float) -> datetime:
    """Convert an `anyio.current_time()` deadline to a UTC wall-clock time."""
    return datetime.now(UTC) + timedelta(seconds=monotonic_deadline - anyio.current_time())


@dataclass(eq=False)
class Session:
    """One live resource instance owned by one worker.

    Calls take `lock` (FIFO) so they run one at a time in arrival order; `active_calls`
    counts calls waiting or running, and a session with any is never reaped.
    """

    session_id: str
    worker_id: str
    resource_type: str
    name: str | None
    config: BaseModel
    temporary: bool = False
    state: Any = None
    status: SessionStatus = SessionStatus.CREATING
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    last_used: float = field(default_factory=anyio.current_time)
    active_calls: int = 0
    calls: int = 0
    ready: anyio.Event = field(default_factory=anyio.Event)
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    running: set[anyio.CancelScope] = field(default_factory=set)
    failure: str | None = None

    def touch(self) -> None:
        self.last_used = anyio.current_time()

    def deadline(self, ttl: float) -> float | None:
        """Monotonic time at which an idle session expires; None while calls are in flight."""
        if self.temporary or self.active_calls:
            return None
        return self.last_used + ttl

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
            details=details or {},
        )


class SessionView(BaseModel):
    """A session as `list_sessions` shows it."""

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
    details: dict[str, Any] = {}


@dataclass(eq=False)
class Worker:
    """Whoever owns sessions: one MCP connection, one `Sandbox` client."""

    worker_id: str
    sessions: dict[str, Session] = field(default_factory=dict)
    closed: bool = False
