"""Which sessions the TTL has expired, and when to look again.

Pure bookkeeping over the engine's worker table; the engine's reaper task calls
`collect_expired` and stops what it returns.
"""

from __future__ import annotations

import math

from session.models import Session, SessionStatus, Worker


def collect_expired(workers: dict[str, Worker], ttl: float, now: float) -> tuple[list[Session], float]:
    """Detach every session idle past `ttl` from its worker; return them and the next deadline.

    A session with a call waiting or running has no deadline (the TTL counts from the end
    of its last call). Workers left empty are forgotten: a worker is only a namespace and
    is made again on its next use.
    """
    expired: list[Session] = []
    next_deadline = math.inf
    for worker in list(workers.values()):
        for session in list(worker.sessions.values()):
            deadline = session.deadline(ttl) if session.status is SessionStatus.ACTIVE else None
            if deadline is None:
                continue
            if deadline <= now:
                del worker.sessions[session.resource_type]
                expired.append(session)
            else:
                next_deadline = min(next_deadline, deadline)
        if not worker.sessions:
            workers.pop(worker.worker_id, None)
    return expired, next_deadline
