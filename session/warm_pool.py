"""Pre-started sessions per resource, so `create_session` and temporary calls skip start-up.

A pool member is a session started with the resource's default config and policy, owned by
nobody and counted against no cap. Taking one gives it to exactly one caller (with a fresh
handle); it is never recycled. The engine refills pools in the background, up to
`concurrency` starts at once; an empty pool never delays a call (the caller starts its own
session, as without a pool).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from session.models import Session

#: Members started at once while refilling: a sandboxed start mostly waits on the kernel
#: (namespaces, mounts), so a few in flight refill a drained pool in about one start's time
#: (measured in bench/bench_starts.py).
REFILL_CONCURRENCY = 4


@dataclass(eq=False)
class WarmPool:
    resource: str
    target: int
    concurrency: int = REFILL_CONCURRENCY
    ready: deque[Session] = field(default_factory=deque)
    starting: list[Session] = field(default_factory=list)
    failures: int = 0
    taken: int = 0
    retry_at: float = 0.0
    """After a failed start: no refill before this (monotonic) time."""
    launched: set[Session] = field(default_factory=set)
    """Members of `starting` whose start has begun (past the refill's short delay)."""
    claimed: set[Session] = field(default_factory=set)
    """Members still starting that a caller waits for; they skip `ready` and go to it."""

    def missing(self) -> int:
        return max(self.target - len(self.ready) - len(self.starting), 0)

    def pop(self) -> Session | None:
        return self.ready.popleft() if self.ready else None

    def put_back(self, session: Session) -> None:
        self.ready.appendleft(session)

    def claim(self) -> Session | None:
        """The unclaimed member whose start began first (the nearest to ready), now claimed."""
        for session in self.starting:
            if session in self.launched and session not in self.claimed:
                self.claimed.add(session)
                return session
        return None

    def unclaim(self, session: Session) -> None:
        """A claimer gave up (cancelled, refused by a cap): the member serves the pool again."""
        self.claimed.discard(session)
        if session not in self.starting and session.ready.is_set() and session.live:
            self.put_back(session)

    def describe(self) -> dict[str, object]:
        """Counts, and the members' labels (not secrets: they name cgroups and scratch dirs)."""
        return {
            "target": self.target,
            "ready": len(self.ready),
            "starting": len(self.starting),
            "taken": self.taken,
            "failures": self.failures,
            "claimed": len(self.claimed),
            "members": [s.label for s in (*self.ready, *self.starting)],
        }
