"""Pre-started sessions per resource, so `create_session` and temporary calls skip start-up.

A pool member is a session started with the resource's default config and policy, owned by
nobody and counted against no cap. Taking one gives it to exactly one caller (with a fresh
handle); it is never recycled. The engine refills pools in the background; an empty pool
never delays a call (the caller starts its own session, as without a pool).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from session.models import Session


@dataclass(eq=False)
class WarmPool:
    resource: str
    target: int
    ready: deque[Session] = field(default_factory=deque)
    starting: list[Session] = field(default_factory=list)
    failures: int = 0
    taken: int = 0

    def missing(self) -> int:
        return max(self.target - len(self.ready) - len(self.starting), 0)

    def pop(self) -> Session | None:
        return self.ready.popleft() if self.ready else None

    def put_back(self, session: Session) -> None:
        self.ready.appendleft(session)

    def describe(self) -> dict[str, object]:
        """Counts, and the members' labels (not secrets: they name cgroups and scratch dirs)."""
        return {
            "target": self.target,
            "ready": len(self.ready),
            "starting": len(self.starting),
            "taken": self.taken,
            "failures": self.failures,
            "members": [s.label for s in (*self.ready, *self.starting)],
        }
