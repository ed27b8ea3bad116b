"""Ray's failures, as the spec's error codes.

| what Ray says                                        | the caller gets                              |
| the host actor is unavailable (node not yet dead)    | 5002: the node is unreachable, retry         |
| the host actor died, its node declared dead          | 1003: the node running this session was lost |
| the host actor died, its node alive (process lost)   | 1003: the process holding it was lost        |
| anything else from Ray (GCS unreachable, ...)        | 5002: the cluster is unreachable, retry      |
"""

from __future__ import annotations

import ray

from session.errors import SandboxError, ServiceUnavailable, SessionError

NODE_UNREACHABLE = (
    "the node running this session is unreachable right now (Ray has not declared it dead); retry in a few "
    "seconds: if the node is gone for good its sessions will answer that they were lost"
)
NODE_LOST = (
    "the node running this session was lost (Ray declared it dead), and its sessions with it; create a new "
    "session with create_session"
)
HOST_LOST = (
    "the process holding this session was lost (its Ray actor died), and its sessions with it; create a new "
    "session with create_session"
)
CLUSTER_UNREACHABLE = "the Ray cluster behind this server is unreachable right now; retry in a few seconds"


def is_actor_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, ray.exceptions.ActorUnavailableError)


def is_actor_dead(exc: BaseException) -> bool:
    return isinstance(exc, ray.exceptions.RayActorError) and not is_actor_unavailable(exc)


class HostLost(SessionError):
    """The host a call went to is gone (1003): for a session it held, final; for a new or
    temporary session, the front end places the call again."""


def lost(node_alive: bool) -> SandboxError:
    return HostLost(HOST_LOST if node_alive else NODE_LOST)


def unreachable(exc: BaseException) -> SandboxError:
    """A failure that may pass (an unavailable actor, an unreachable GCS): 5002."""
    if is_actor_unavailable(exc):
        return ServiceUnavailable(NODE_UNREACHABLE)
    return ServiceUnavailable(f"{CLUSTER_UNREACHABLE} ({type(exc).__name__})")
