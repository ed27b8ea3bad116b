"""A direct path for the common 2026-07-28 `tools/call` POST, in front of the SDK's HTTP app.

A 2026-07-28 request is one self-contained POST, and a tool call without a progress token
has nothing to stream: the SDK still walks it through Starlette's router and middleware, a
task group with a memory stream, a per-request runner, an OpenTelemetry span and two pydantic
round trips before the engine sees it. Here such a request is checked the way the SDK checks
it (Content-Type, Host/Origin, Accept, routing headers, the `_meta` envelope ladder, the
protocol version's request surface), handed to the engine through the same `run_call` and
shaped by the same `call_result` and `serverInfo` stamp, and answered as one
`application/json` body (orjson both ways).

Anything this path does not fully recognise - another method, a progress token, a log-level
opt-in, an `Mcp-Session-Id` or a query string, a failed check, a body orjson cannot read - goes to the SDK
unchanged, with the body replayed, so every error is the SDK's own answer. A client that
disconnects mid-call cancels the call, as on the SDK's path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import anyio
import orjson
from mcp.server import Server
from mcp.server.transport_security import DEFAULT_MAX_REQUEST_BODY_SIZE, TransportSecuritySettings
from mcp.shared.inbound import (
    MCP_PROTOCOL_VERSION_HEADER,
    InboundLadderRejection,
    classify_inbound_request,
    x_mcp_header_map,
)
from mcp_types import SERVER_INFO_META_KEY
from mcp_types import methods as surfaces
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcp_server.app import call_result, run_call, tool_listing
from mcp_server.auth import principal_of
from mcp_server.http_protocol import DISCONNECT_EXTENSION, DisconnectSignal
from mcp_server.worker_identity import modern_http_caller
from session.engine import Engine
from session.models import Caller
from session.tool_calls import CallOutcome

log = logging.getLogger(__name__)

_TOOLS_CALL: Final = "tools/call"
_ROUTING_HEADERS: Final = frozenset({b"mcp-protocol-version", b"mcp-method", b"mcp-name"})
#: The headers the SDK's checks of a 2026-07-28 tool call read (ASGI names are lowercase).
_READ_HEADERS: Final = _ROUTING_HEADERS | {
    b"mcp-session-id",
    b"content-type",
    b"content-length",
    b"accept",
    b"host",
    b"origin",
}
#: The only members a request this path serves may have; anything else is the SDK's to judge.
_REQUEST_KEYS: Final = frozenset({"jsonrpc", "id", "method", "params"})
_PARAMS_KEYS: Final = frozenset({"name", "arguments", "_meta"})
#: `_meta` keys that ask for something sent on the response stream: the SDK serves those.
_STREAMING_META_KEYS: Final = frozenset({"progressToken", "io.modelcontextprotocol/logLevel"})
_JSON_HEADERS: Final = (b"content-type", b"application/json")


class FastToolCalls:
    """ASGI app: serve plain 2026-07-28 `tools/call` POSTs at `path` directly, pass the rest to `app`.

    `server` is the SDK server `app` serves (its tool schemas, server info and middleware
    are read once here); `security` is the Host/Origin allow-list the SDK's transport uses.
    The path is off (every request goes to `app`) when the server has request middleware
    or a cache hint for `tools/call`, which this path would bypass.
    """

    def __init__(
        self,
        app: ASGIApp,
        engine: Engine,
        server: Server[Any],
        *,
        security: TransportSecuritySettings | None,
        path: str = "/mcp",
        max_body_size: int = DEFAULT_MAX_REQUEST_BODY_SIZE,
    ) -> None:
        self.app = app
        self._engine = engine
        self._path = path
        self._max_body = max_body_size
        self._security = security if security is not None and security.enable_dns_rebinding_protection else None
        self.enabled = not server.middleware and _TOOLS_CALL not in server.cache_hints
        if not self.enabled:
            log.info("HTTP fast path off: the server has request middleware or a tools/call cache hint")
        # Tools whose schema declares `Mcp-Param-*` headers: the SDK checks those headers.
        self._header_bound = {tool.name for tool in tool_listing(engine) if x_mcp_header_map(tool.input_schema)}
        # Built once and never mutated: each response is serialised from it at once.
        self._server_info = server.server_info_stamp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            not self.enabled
            or scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] != self._path
            # A query string can name an SSE session (`?session_id=`), which decides the worker.
            or scope.get("query_string")
            or (headers := self._plain_headers(scope)) is None
        ):
            await self.app(scope, receive, send)
            return
        messages, body = await _read_body(receive, self._max_body)
        call = self._parse(body, headers) if body is not None else None
        if call is None:
            await self.app(scope, _replay(messages, receive), send)
            return
        await self._serve(call, scope, receive, send)

    def _plain_headers(self, scope: Scope) -> dict[str, str] | None:
        """The request's headers by (lowercase) name if nothing in them needs the SDK, else None."""
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            if raw_name not in _READ_HEADERS:
                continue
            name = raw_name.decode("latin-1")
            if name in headers:
                if raw_name in _ROUTING_HEADERS:
                    return None  # the SDK answers a duplicated routing header with HEADER_MISMATCH
                continue  # as Starlette's `headers.get`, the first one counts
            headers[name] = raw_value.decode("latin-1")
        version = headers.get(MCP_PROTOCOL_VERSION_HEADER)
        if version not in MODERN_PROTOCOL_VERSIONS:
            return None  # the handshake era, or a version the SDK must refuse
        if "mcp-session-id" in headers:
            return None
        if not headers.get("content-type", "").lower().startswith("application/json"):
            return None
        if not _accepts_json_and_sse(headers.get("accept", "")):
            return None  # the SDK answers 406
        if self._security is not None and not (
            _allowed(headers.get("host"), self._security.allowed_hosts)
            and (not headers.get("origin") or _allowed(headers.get("origin"), self._security.allowed_origins))
        ):
            return None  # the SDK answers 421 / 403 (and logs it)
        length = headers.get("content-length")
        if length is None or not length.isdigit() or int(length) > self._max_body:
            return None
        return headers

    def _parse(self, body: bytes, headers: Mapping[str, str]) -> _Call | None:
        """The call a body asks for, if it is one this path serves exactly as the SDK would."""
        try:
            decoded = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(decoded, dict) or decoded.keys() - _REQUEST_KEYS or decoded.get("jsonrpc") != "2.0":
            return None
        request_id = decoded.get("id")
        if isinstance(request_id, bool) or not isinstance(request_id, int | str):
            return None
        params = decoded.get("params")
        if decoded.get("method") != _TOOLS_CALL or not isinstance(params, dict) or params.keys() - _PARAMS_KEYS:
            return None
        name, arguments, meta = params.get("name"), params.get("arguments", {}), params.get("_meta")
        if not isinstance(name, str) or not isinstance(arguments, dict) or name in self._header_bound:
            return None
        if not isinstance(meta, dict) or not _STREAMING_META_KEYS.isdisjoint(meta):
            return None
        route = classify_inbound_request(decoded, headers=headers)
        if isinstance(route, InboundLadderRejection):
            return None
        try:
            surfaces.validate_client_request(_TOOLS_CALL, route.protocol_version, params)
        except (KeyError, ValueError, ValidationError):  # ValidationError is a ValueError; named for the reader
            return None
        return _Call(request_id, name, arguments, meta, route.protocol_version)

    async def _serve(self, call: _Call, scope: Scope, receive: Receive, send: Send) -> None:
        principal = principal_of(scope)

        def resolve() -> Caller:
            return modern_http_caller(principal, call.meta)

        signal = scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
        if isinstance(signal, DisconnectSignal):
            # The protocol tells us of a disconnect: no task has to wait on `receive()` for it.
            with anyio.CancelScope() as cancel_scope:
                signal.watch(cancel_scope.cancel)
                try:
                    outcome = await run_call(self._engine, resolve, call.name, call.arguments, None)
                finally:
                    signal.watch(None)
            if cancel_scope.cancelled_caught or signal.fired:
                return  # the client is gone and the call was cancelled: nobody to answer
        else:
            finished = await _cancel_on_disconnect(
                receive, run_call(self._engine, resolve, call.name, call.arguments, None)
            )
            if finished is None:
                return
            outcome = finished
        body = self._response(call, call_result(outcome))
        await send({"type": "http.response.start", "status": 200, "headers": [_JSON_HEADERS, _length(body)]})
        await send({"type": "http.response.body", "body": body})

    def _response(self, call: _Call, result: dict[str, Any]) -> bytes:
        """The JSON-RPC response, as the SDK's runner makes it for a 2026-07-28 result: what the
        version's result sieve makes of `call_result` (that dict itself, by construction and by
        test) with the `serverInfo` stamp."""
        result["_meta"] = {SERVER_INFO_META_KEY: self._server_info}
        message = {"jsonrpc": "2.0", "id": call.request_id, "result": result}
        try:
            return orjson.dumps(message)
        except TypeError:  # an integer beyond 64 bits, say: the standard library writes anything
            return json.dumps(message, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class _Call:
    request_id: int | str
    name: str
    arguments: dict[str, Any]
    meta: dict[str, Any]
    version: str


async def _cancel_on_disconnect(receive: Receive, call: Awaitable[CallOutcome]) -> CallOutcome | None:
    """Await `call`, cancelled if the client disconnects first (then None): for servers whose
    protocol gives no `DisconnectSignal`, a task waits on `receive()` as the SDK's does."""
    outcome: CallOutcome | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        outcome = await call
        tg.cancel_scope.cancel()
    return outcome


async def _read_body(receive: Receive, limit: int) -> tuple[list[Message], bytes | None]:
    """Every message received while reading the body, and the body (None: too large or cut short)."""
    messages: list[Message] = []
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return messages, None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return messages, chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that yields `messages` again before the connection's next ones."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


def _accepts_json_and_sse(accept: str) -> bool:
    """`check_accept_headers` of the SDK (wildcards included), both answers required."""
    types = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    if "*/*" in types:
        return True
    return bool(types & {"application/json", "application/*"}) and bool(types & {"text/event-stream", "text/*"})


def _allowed(value: str | None, allowed: list[str]) -> bool:
    """The SDK's Host/Origin allow-list match: exact, or `base:*` for any port of `base`."""
    if not value:
        return False
    if value in allowed:
        return True
    return any(entry.endswith(":*") and value.startswith(entry[:-1]) for entry in allowed)


def _length(body: bytes) -> tuple[bytes, bytes]:
    return (b"content-length", str(len(body)).encode())
