"""Bearer-token authentication for the HTTP and SSE endpoints, as a pure ASGI middleware.

Pure ASGI (not Starlette's BaseHTTPMiddleware, which buffers and breaks streaming): the
wrapped app's SSE streams pass through untouched. Every request except `GET /health`
must carry `Authorization: Bearer <token>`; the token is compared in constant time with
every configured token, and the matching principal's NAME is stored at
`scope["state"]["principal"]` (`request.state.principal` in Starlette), where worker
identity reads it. It is also given to the SDK as `scope["user"]` (an `AuthenticatedUser`
whose `client_id` is the name), which makes the SDK bind every transport session
(`Mcp-Session-Id`, SSE `session_id`) to the principal that opened it: another principal
naming it gets 404, as if it did not exist. Refusals are 401 (`WWW-Authenticate: Bearer`) or, once an address has
spent its budget of refusals, 429 without comparing anything.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Mapping
from typing import Final

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from starlette.types import ASGIApp, Receive, Scope, Send

from mcp_server.ratelimit import AddressLimiter, RateLimitedLog
from mcp_server.tokens import DEFAULT_PRINCIPAL

log = logging.getLogger(__name__)

PRINCIPAL_KEY: Final = "principal"
HEALTH_PATH: Final = "/health"
REALM: Final = "agentflow-sandbox"
# Refused requests an address may make at once, and how many more per second after that.
FAILURE_BURST: Final = 20.0
FAILURE_RATE: Final = 2.0


def principal_of(scope: Scope) -> str | None:
    """The authenticated principal's name for this request (None outside the middleware)."""
    state = scope.get("state")
    return state.get(PRINCIPAL_KEY) if isinstance(state, dict) else None


class BearerAuth:
    """ASGI middleware: authenticate every HTTP request but `GET /health`; refuse websockets.

    `tokens` maps principal name to token. With `tokens=None` (`serve --no-auth`) every
    request is let through as principal "default".
    """

    def __init__(
        self,
        app: ASGIApp,
        tokens: Mapping[str, str] | None,
        *,
        failure_burst: float = FAILURE_BURST,
        failure_rate: float = FAILURE_RATE,
    ) -> None:
        self.app = app
        self._tokens = [(name, token.encode()) for name, token in (tokens or {}).items()]
        self._open = tokens is None
        if not self._open and not self._tokens:
            raise ValueError("BearerAuth needs at least one token (or tokens=None for no authentication)")
        # One SDK user object per principal, built once: it carries the name only, never the token.
        self._users = {name: _user(name) for name, _ in self._tokens} | {DEFAULT_PRINCIPAL: _user(DEFAULT_PRINCIPAL)}
        self._limiter = AddressLimiter(failure_burst, failure_rate)
        self._refusals = RateLimitedLog(log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and scope["path"] == HEALTH_PATH:
            await self.app(scope, receive, send)
            return
        if self._open:
            self._admit(scope, DEFAULT_PRINCIPAL)
            await self.app(scope, receive, send)
            return
        address = _client_address(scope)
        if scope["type"] == "websocket":  # no MCP endpoint speaks websocket: refuse before any work
            await receive()
            await send({"type": "websocket.close", "code": 1008})
            return
        if self._limiter.limited(address):
            self._refuse_log(scope, address, "too many refused requests")
            await _reply(send, 429, "too many requests with a missing or wrong token; retry later", retry_after=1)
            return
        presented = _bearer(scope)
        principal = self._match(presented) if presented is not None else None
        if principal is None:
            self._limiter.spend(address)
            reason = "missing bearer token" if presented is None else "wrong bearer token"
            self._refuse_log(scope, address, reason)
            await _reply(send, 401, _unauthorized_message(presented is None), invalid=presented is not None)
            return
        self._admit(scope, principal)
        await self.app(scope, receive, send)

    def _match(self, presented: bytes) -> str | None:
        """The principal whose token equals `presented`; every token is compared, in constant time."""
        found: str | None = None
        for name, token in self._tokens:
            if hmac.compare_digest(presented, token) and found is None:
                found = name
        return found

    def _refuse_log(self, scope: Scope, address: str, reason: str) -> None:
        method = scope.get("method", "WEBSOCKET")
        self._refusals.log(
            logging.WARNING, "refused %s %s from %s: %s", method, scope.get("path", "?"), address, reason
        )

    def _admit(self, scope: Scope, principal: str) -> None:
        scope.setdefault("state", {})[PRINCIPAL_KEY] = principal
        scope["user"] = self._users[principal]


def _user(principal: str) -> AuthenticatedUser:
    # The SDK keys session ownership on client_id; the token itself is never kept.
    return AuthenticatedUser(AccessToken(token="", client_id=principal, scopes=[]))


def _client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _bearer(scope: Scope) -> bytes | None:
    """The token of the request's single `Authorization: Bearer` header, else None."""
    values: list[bytes] = [bytes(v) for name, v in scope.get("headers", ()) if name.lower() == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return token


def _unauthorized_message(missing: bool) -> str:
    what = "this server requires" if missing else "wrong token; this server requires"
    return (
        f"{what} 'Authorization: Bearer <token>'. The token is AGENTFLOW_SANDBOX_TOKEN, a manifest "
        "server.tokens entry, or the generated one in the token file whose path the server logged at start"
    )


async def _reply(send: Send, status: int, message: str, *, invalid: bool = False, retry_after: int = 0) -> None:
    body = json.dumps({"error": "unauthorized" if status == 401 else "too_many_requests", "message": message})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        # A refused client reconnects for its next try: that is what a flood should cost.
        (b"connection", b"close"),
    ]
    if status == 401:
        challenge = f'Bearer realm="{REALM}"' + (', error="invalid_token"' if invalid else "")
        headers.append((b"www-authenticate", challenge.encode()))
    if retry_after:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body.encode()})
