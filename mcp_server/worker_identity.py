"""Which worker a request belongs to, and when that worker ends.

The one module that touches SDK internals (`ctx.session._connection`, pinned to
`mcp==2.3.*`); tests cover it per transport and protocol era so an upgrade fails here.

| how the client talks                         | worker                     | ends when                  |
| stdio, either era                            | the process pipe           | stdin EOF                  |
| SSE, either era                              | the SSE connection         | the stream closes          |
| streamable HTTP, handshake (Mcp-Session-Id)  | the MCP session            | DELETE / idle expiry       |
| streamable HTTP, 2026-07-28 (no session)     | the `_meta` worker key     | TTL only                   |

A worker key in the request `_meta` (`agentflow/worker_id`) names the worker on every
transport; where a connection exists it still decides the worker's end. Without key
or connection the caller has no worker: its calls use sessions by handle (`session_id`)
or temporary ones. The principal (who is calling) is the bearer token's name on HTTP and
SSE (set by `mcp_server.auth`), and `local` on stdio and in-process.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from mcp.server import ServerRequestContext
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from session.errors import ParameterError
from session.models import LOCAL_PRINCIPAL, Caller

WORKER_META_KEY = "agentflow/worker_id"
#: At least 128 bits of a random key in base64url; long enough that keys cannot be guessed.
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{22,128}$")


@dataclass(eq=False)
class RunScope:
    """What the server lifespan yields: the exit stack of one `Server.run` (stdio, SSE)."""

    exit_stack: AsyncExitStack
    scope_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    registered: set[str] = field(default_factory=set)


def resolve_caller(ctx: ServerRequestContext[Any, Any], on_disconnect: Callable[[str], None]) -> Caller:
    """Name the request's principal and worker; tie the worker's end to the connection's, once.

    Raises:
        ParameterError: the `_meta` worker key is malformed.
    """
    principal = _principal(ctx)
    key = worker_key_of(ctx.meta)
    scope = _connection_scope(ctx)
    if key is not None:
        worker = f"key:{key}"
    elif scope is not None:
        worker = f"conn:{scope[0]}"
    else:
        return Caller(principal, None)
    caller = Caller(principal, worker)
    if scope is not None:
        _, stack, registered = scope
        worker_key = caller.worker_key
        assert worker_key is not None
        if worker_key not in registered:
            registered.add(worker_key)

            async def disconnected() -> None:
                on_disconnect(worker_key)

            stack.push_async_callback(disconnected)
    return caller


def modern_http_caller(principal: object, meta: Mapping[str, Any] | None) -> Caller:
    """The caller of a 2026-07-28 HTTP request, from the principal the auth middleware set and
    the request `_meta`: what `resolve_caller` decides for that row, without an SDK context
    (the HTTP fast path has none). No connection outlives such a request, so nothing is registered.

    Raises:
        ParameterError: the `_meta` worker key is malformed.
    """
    key = worker_key_of(meta)
    return Caller(_principal_name(principal), None if key is None else f"key:{key}")


def worker_key_of(meta: Mapping[str, Any] | None) -> str | None:
    """The request's `_meta` worker key, checked; None without one.

    Raises:
        ParameterError: the key is not a string of 22-128 safe characters.
    """
    key = (meta or {}).get(WORKER_META_KEY)
    if key is not None and (not isinstance(key, str) or not _KEY_PATTERN.match(key)):
        raise ParameterError(
            f"_meta[{WORKER_META_KEY!r}] must be 22-128 characters of letters, digits and ._:- "
            "(a random id of at least 128 bits, e.g. secrets.token_urlsafe(16))"
        )
    return key


def _principal(ctx: ServerRequestContext[Any, Any]) -> str:
    """The authenticated principal's name (HTTP/SSE, set by the auth middleware), else local."""
    request = ctx.request
    if request is None:
        return LOCAL_PRINCIPAL
    return _principal_name(getattr(request.state, "principal", None))


def _principal_name(name: object) -> str:
    return name if isinstance(name, str) and name else "default"


def _connection_scope(ctx: ServerRequestContext[Any, Any]) -> tuple[str, AsyncExitStack, set[str]] | None:
    request = ctx.request
    sse_id = request.query_params.get("session_id") if request is not None else None
    if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
        connection = ctx.session._connection  # private in mcp 2.3; the public accessor is planned
        if request is None or sse_id or connection.session_id:
            state = connection.state
            scope_id = state.setdefault("agentflow.scope", connection.session_id or sse_id or uuid.uuid4().hex)
            registered: set[str] = state.setdefault("agentflow.workers", set())
            return scope_id, connection.exit_stack, registered
        return None  # stateless HTTP in the handshake era: no connection outlives the request
    if request is None or sse_id:
        # Modern era over stdio/SSE: one `Server.run` spans the connection; its lifespan is ours.
        run = ctx.lifespan_context
        if isinstance(run, RunScope):
            return (sse_id or run.scope_id), run.exit_stack, run.registered
    return None
