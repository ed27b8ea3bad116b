"""How many sessions may be live: the manifest's global and per-resource limits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import anyio

from session.errors import ResourceUnavailable


@dataclass(frozen=True, slots=True)
class Limits:
    max_sessions: int | None = None
    per_resource: Mapping[str, int] = field(default_factory=dict)


class SessionBudget:
    """Counts live sessions (explicit and temporary); `reserve` refuses past a limit."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.live = 0
        self.by_resource: dict[str, int] = {}
        self._drained: anyio.Event | None = None  # made on first use: an Event needs a running loop

    def reserve(self, resource: str) -> None:
        """Raises: ResourceUnavailable (2004) when a limit is reached."""
        per = self.limits.per_resource.get(resource)
        if self.limits.max_sessions is not None and self.live >= self.limits.max_sessions:
            raise ResourceUnavailable(
                f"the server's session limit ({self.limits.max_sessions}) is reached; "
                "destroy sessions you no longer need"
            )
        if per is not None and self.by_resource.get(resource, 0) >= per:
            raise ResourceUnavailable(f"the limit of {per} live {resource!r} sessions is reached; try later")
        if self.live == 0:
            self._drained = anyio.Event()
        self.live += 1
        self.by_resource[resource] = self.by_resource.get(resource, 0) + 1

    def release(self, resource: str) -> None:
        self.live -= 1
        self.by_resource[resource] -= 1
        if self.live == 0 and self._drained is not None:
            self._drained.set()

    async def drained(self) -> None:
        """Return once no session is live (every cleanup under way has finished)."""
        if self.live and self._drained is not None:
            await self._drained.wait()
