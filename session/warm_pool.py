"""Pre-started sessions per resource, so `create_session` and temporary calls skip start-up.

A pool member is a session started with the resource's default config and policy, owned by
nobody and counted against no cap. Taking one gives it to exactly one caller (with a fresh
handle); it is never recycled. The engine refills pools in the background, up to
`concurrency` starts at once; an empty pool never delays a call (the caller starts its own
session, as without a pool).

Size: a pool keeps `base` members while demand is low and grows, up to `cap`, to the largest
demand it saw in any `GROW_WINDOW` of the last `decay` seconds (demand: every call that
wanted a member, served or not). Batch users start episodes in waves: a wave of 50 creates
finds 8 members, the pool grows to 50, and the next wave finds 50. Once no wave of that size
came for `decay` seconds, the target falls back and the engine stops the surplus (oldest
first).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from session.models import Session

#: Members started at once while refilling: a sandboxed start mostly waits on the kernel
#: (namespaces, mounts), so a few in flight refill a drained pool in about one start's time
#: (measured in bench/bench_starts.py).
REFILL_CONCURRENCY = 4
#: Demand is counted over this many seconds, about the time the refill needs to restock a
#: pool of a few dozen members here (0.4-0.9 s measured): what arrives faster than that is what
#: a deeper pool absorbs. A wave of workers starting episodes lands well inside it; a single
#: caller in a loop (one call every few ms) grows the pool only by what it consumes per window.
GROW_WINDOW = 0.5
#: Seconds a grown pool keeps its size after the demand that grew it (manifest `pool_decay`).
DEFAULT_DECAY = 120.0


@dataclass(frozen=True, slots=True)
class PoolSize:
    """How large one resource's pool may be: `base` when quiet, up to `cap` under demand."""

    base: int
    cap: int | None = None
    """None: the pool stays at `base` (no growth)."""
    decay: float = DEFAULT_DECAY

    def __post_init__(self) -> None:
        if self.base < 1 or (self.cap is not None and self.cap < self.base) or self.decay <= 0:
            raise ValueError(f"invalid pool size {self!r}: need 1 <= base <= cap and decay > 0")

    @classmethod
    def of(cls, size: int | PoolSize) -> PoolSize:
        return size if isinstance(size, PoolSize) else cls(size)


@dataclass(eq=False)
class WarmPool:
    resource: str
    size: PoolSize
    clock: Callable[[], float]
    """Monotonic seconds (the engine's clock; tests drive their own)."""
    concurrency: int = REFILL_CONCURRENCY
    ready: deque[Session] = field(default_factory=deque)
    """Oldest first: hand-outs and surplus stops both take from the left."""
    starting: list[Session] = field(default_factory=list)
    failures: int = 0
    taken: int = 0
    misses: int = 0
    """Calls that wanted a member and found none ready or under way (they started their own)."""
    retry_at: float = 0.0
    """After a failed start: no refill before this time (on `clock`)."""
    launched: set[Session] = field(default_factory=set)
    """Members of `starting` whose start has begun (past the refill's short delay)."""
    claimed: set[Session] = field(default_factory=set)
    """Members still starting that a caller waits for; they skip `ready` and go to it."""
    retiring: set[Session] = field(default_factory=set)
    """Surplus members taken out of `ready` whose stop has not finished (shutdown finishes it)."""
    _recent: deque[float] = field(default_factory=deque)
    """Times of the demand within the last GROW_WINDOW."""
    _peaks: deque[tuple[float, int]] = field(default_factory=deque)
    """(time, demand in the window then), counts strictly decreasing: the front is the largest
    demand of the last `decay` seconds (a sliding-window maximum)."""

    @property
    def base(self) -> int:
        return self.size.base

    @property
    def cap(self) -> int:
        return self.size.cap if self.size.cap is not None else self.size.base

    @property
    def target(self) -> int:
        """How many members the pool wants now: the recent peak demand, within base..cap."""
        self._expire(self.clock())
        peak = self._peaks[0][1] if self._peaks else 0
        return min(max(peak, self.base), self.cap)

    def next_change(self) -> float | None:
        """When the target may next fall (the current peak ages out), on `clock`; None if at base."""
        if not self._peaks or self.target <= self.base:
            return None
        return self._peaks[0][0] + self.size.decay

    def demand(self) -> None:
        """A call wanted a member (served or not): counts toward the size the pool grows to."""
        now = self.clock()
        self._recent.append(now)
        self._expire(now)
        count = len(self._recent)
        while self._peaks and self._peaks[-1][1] <= count:
            self._peaks.pop()
        self._peaks.append((now, count))

    def _expire(self, now: float) -> None:
        while self._recent and self._recent[0] <= now - GROW_WINDOW:
            self._recent.popleft()
        while self._peaks and self._peaks[0][0] <= now - self.size.decay:
            self._peaks.popleft()

    def held(self) -> int:
        """Members the pool has or will have: ready, and starting unless a caller claimed them."""
        return len(self.ready) + sum(1 for session in self.starting if session not in self.claimed)

    def missing(self) -> int:
        return max(self.target - self.held(), 0)

    def surplus(self) -> list[Session]:
        """Ready members beyond the target (oldest first), taken out of the pool for stopping."""
        extra = min(self.held() - self.target, len(self.ready))
        surplus = [self.ready.popleft() for _ in range(max(extra, 0))]
        self.retiring.update(surplus)
        return surplus

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
            "base": self.base,
            "cap": self.cap,
            "ready": len(self.ready),
            "starting": len(self.starting),
            "taken": self.taken,
            "misses": self.misses,
            "failures": self.failures,
            "claimed": len(self.claimed),
            "members": [s.label for s in (*self.ready, *self.starting)],
        }
