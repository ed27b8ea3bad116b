"""Which sessions the TTL (or a disconnect grace) has expired, and when to look again.

Pure bookkeeping over the engine's session table; the engine's reaper task calls
`collect_expired` and stops what it returns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from session.models import Session, SessionStatus


def collect_expired(sessions: Iterable[Session], ttl: float, now: float) -> tuple[list[Session], float]:
    """The sessions idle past `ttl` (or past their disconnect grace), and the next deadline.

    A session with a call waiting or running has no deadline (the TTL counts from the end
    of its last call).
    """
    expired: list[Session] = []
    next_deadline = math.inf
    for session in sessions:
        deadline = session.deadline(ttl) if session.status is SessionStatus.ACTIVE else None
        if deadline is None:
            continue
        if deadline <= now:
            expired.append(session)
        else:
            next_deadline = min(next_deadline, deadline)
    return expired, next_deadline
