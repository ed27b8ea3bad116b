"""How many sessions may be live: per server, per resource, per principal and per worker."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import anyio

from session.errors import ResourceUnavailable


@dataclass(frozen=True, slots=True)
class Limits:
    """Session caps; None means no cap. Temporary sessions count against the server and
    resource caps only (they live for one call)."""

    max_sessions: int | None = None
    per_resource: Mapping[str, int] = field(default_factory=dict)
    per_principal: int | None = None
    per_worker: int | None = None


class SessionBudget:
    """Counts live sessions; `reserve` refuses past a cap (2004), `release` gives back.

    Also counts cleanups still running after their session was released (a destroyed
    session's processes are killed at once; reaping and removal finish in the background),
    so `drained` waits for those too.
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.live = 0
        self.cleanups = 0
        self.by_resource: Counter[str] = Counter()
        self.by_principal: Counter[str] = Counter()
        self.by_worker: Counter[str] = Counter()
        self._drained: anyio.Event | None = None  # made on first use: an Event needs a running loop

    def reserve(self, resource: str, principal: str | None = None, worker: str | None = None) -> None:
        """Raises: ResourceUnavailable (2004) naming the cap that is reached."""
        limits = self.limits
        per = limits.per_resource.get(resource)
        if limits.max_sessions is not None and self.live >= limits.max_sessions:
            raise ResourceUnavailable(
                f"the server's session limit ({limits.max_sessions}) is reached; destroy sessions you no longer need"
            )
        if per is not None and self.by_resource[resource] >= per:
            raise ResourceUnavailable(f"the limit of {per} live {resource!r} sessions is reached; try later")
        cap = limits.per_principal
        if principal is not None and cap is not None and self.by_principal[principal] >= cap:
            raise ResourceUnavailable(
                f"your credentials' session limit ({cap}) is reached; destroy sessions you no longer need"
            )
        if worker is not None and limits.per_worker is not None and self.by_worker[worker] >= limits.per_worker:
            raise ResourceUnavailable(
                f"this client's session limit ({limits.per_worker}) is reached; destroy sessions you no longer need"
            )
        self._busy()
        self.live += 1
        self.by_resource[resource] += 1
        if principal is not None:
            self.by_principal[principal] += 1
        if worker is not None:
            self.by_worker[worker] += 1

    def release(self, resource: str, principal: str | None = None, worker: str | None = None) -> None:
        self.live -= 1
        self.by_resource[resource] -= 1
        if principal is not None:
            self.by_principal[principal] -= 1
        if worker is not None:
            self.by_worker[worker] -= 1
        self._maybe_drained()

    def cleanup_started(self) -> None:
        self._busy()
        self.cleanups += 1

    def cleanup_finished(self) -> None:
        self.cleanups -= 1
        self._maybe_drained()

    def _busy(self) -> None:
        if self.live == 0 and self.cleanups == 0:
            self._drained = anyio.Event()

    def _maybe_drained(self) -> None:
        if self.live == 0 and self.cleanups == 0 and self._drained is not None:
            self._drained.set()

    async def drained(self) -> None:
        """Return once no session is live and no background cleanup is running."""
        if (self.live or self.cleanups) and self._drained is not None:
            await self._drained.wait()
