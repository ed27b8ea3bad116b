"""The light HTTP path of `Sandbox(url)`: MCP 2026-07-28 as plain JSON-RPC POSTs over pooled connections.

Why: the official client (`mcp.Client` over `streamable_http_client` and httpx2) costs
1.0-1.4 ms of CPU per call on this 2-core machine (bench/bench_client_http.py: 50 workers
x 20 `bash_run`, one process), more than the server spends on the call; this path costs
0.15 ms (0.15-0.3 on a loaded machine). At 2026-07-28 every request is self-contained (no handshake, no
`Mcp-Session-Id`), so a call is one POST: this module sends exactly what the SDK's client
sends at that revision (`mcp/client/session.py`: `_make_modern_stamp`, `send_discover`) —
the `MCP-Protocol-Version`, `Mcp-Method` and `Mcp-Name` headers (and `Mcp-Param-*` for
tools whose schema asks for them), `_meta` with the protocol version, client info and
(empty) capabilities, `progressToken` = the request id when progress is wanted — plus the
worker key and the bearer token. It reads `application/json` and `text/event-stream`
answers (progress notifications go to the callback; the response event ends the call).

Connections: one pool per (event loop, origin), shared by every `Sandbox` on it and
closed with the last of them; each call borrows a keep-alive HTTP/1.1 connection. A
call that is cancelled (or times out) closes its connection instead of returning it,
which is how the server learns to stop the call. Nothing is retried: a POST that fails
after it was sent may have run. The one resend is the spec's `HEADER_MISMATCH`
recovery, which the server answers before running anything.

HTTP library: aiohttp (its C parser). Client CPU per POST+JSON answer, 50 concurrent
workers, 2000 calls against a trivial server on this 2-core machine: httpx2 0.57 ms,
h11 over asyncio streams 0.10 ms, aiohttp 0.10 ms, a hand-made parser over asyncio
streams 0.03 ms, httptools over an asyncio protocol 0.02 ms. aiohttp is well kept and
inside the ~0.3 ms per call this path may spend, so no hand-made HTTP client is needed.
JSON: orjson (dumps of a call + loads of its answer: 4.6 µs, against 13 µs with the standard
library's json; the server's HTTP fast path uses it too).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import select
import urllib.request
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import aiohttp
import anyio
import orjson
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from mcp.client.session import DEFAULT_CLIENT_INFO, DISCOVER_TIMEOUT_SECONDS
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import encode_header_value, find_invalid_x_mcp_header, mcp_param_headers, x_mcp_header_map
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    HEADER_MISMATCH,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PROTOCOL_VERSION_META_KEY,
)
from yarl import URL

from sandbox.sse_events import EventTooLarge, SseParser
from session.errors import PermissionDenied, ServiceUnavailable

log = logging.getLogger(__name__)

PROTOCOL_VERSION: Final = "2026-07-28"
CONNECT_TIMEOUT: Final = 30.0
#: The SDK client's bound on its `server/discover` probe (mcp.client.session.DISCOVER_TIMEOUT_SECONDS).
DISCOVER_TIMEOUT = DISCOVER_TIMEOUT_SECONDS
#: Longest wait for the next byte of an answer (the official client's httpx read timeout).
READ_TIMEOUT: Final = 300.0
#: Cap on one answer (a JSON body or one event of a stream): screenshots are a few MB.
MAX_ANSWER_BYTES: Final = 64 * 1024 * 1024
#: Connections one pool keeps open at most (one per call in flight): the server's default
#: `max_connections`. Calls beyond it wait for one to come free rather than being refused.
#: (Before, each `Sandbox` had its own httpx2 pool of 100.)
MAX_CONNECTIONS: Final = 512
#: An idle connection is closed after this, before servers' usual keep-alive limit (uvicorn: 5 s)
#: can close it under a request on its way.
IDLE_SECONDS: Final = 4.0
_LIST_PAGE_CAP: Final = 100

ProgressCallback = Callable[[float, float | None, str | None], Awaitable[None]]
TokenRefused = Callable[[int], PermissionDenied]

# What `ClientSession` stamps without a `client_info`, and the capabilities a client with no
# sampling / elicitation / roots callback advertises (`ClientSession._build_capabilities`).
_CLIENT_INFO: Final = DEFAULT_CLIENT_INFO.model_dump(by_alias=True, mode="json", exclude_none=True)
_PROTOCOL_META: Final[dict[str, Any]] = {
    PROTOCOL_VERSION_META_KEY: PROTOCOL_VERSION,
    CLIENT_INFO_META_KEY: _CLIENT_INFO,
    CLIENT_CAPABILITIES_META_KEY: {},
}


class _CheckedConnector(aiohttp.TCPConnector):
    """aiohttp's pool, minus handing out an idle connection the server has already closed.

    aiohttp reuses a pooled connection unless its protocol has *processed* the close; a
    server's FIN that arrived but was not read yet (its keep-alive ran out just now) would
    fail the next call, and a failed POST is never retried. A zero-timeout `select` on the
    socket sees it first (what httpcore does): an idle socket that is readable is closed
    (EOF, or bytes nobody asked for) and the next one is tried. `_get` is aiohttp's pool
    lookup (3.14; tests/client/test_light_http.py checks it is still there).
    """

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        while (connection := await super()._get(key, traces)) is not None:
            transport = connection.transport
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None and not select.select([sock.fileno()], [], [], 0)[0]:
                return connection
            connection.close()
        return None


class _Pool:
    """The connections to one origin from one event loop, and what was learned about the server."""

    def __init__(self, origin: URL) -> None:
        self.origin = str(origin)
        self.http = aiohttp.ClientSession(
            proxy=_environment_proxy(origin),
            connector=_CheckedConnector(limit=MAX_CONNECTIONS, keepalive_timeout=IDLE_SECONDS),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT),
            # no cookies: MCP uses none, and the pool is shared by workers that may be different principals
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self.users = 0
        self.ids = itertools.count(1)
        # (endpoint, bearer token) -> speaks 2026-07-28; per token because a refused one learns nothing
        self.modern: dict[tuple[str, str | None], bool] = {}
        self.probing = anyio.Lock()
        # endpoint -> tool name -> its `x-mcp-header` arguments, from the last listing (`Mcp-Param-*`)
        self.header_maps: dict[str, dict[str, dict[tuple[str, ...], str]]] = {}


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Pool]] = weakref.WeakKeyDictionary()


def _acquire(url: URL) -> _Pool:
    origin = url.origin()
    pools = _pools.setdefault(asyncio.get_running_loop(), {})
    pool = pools.get(str(origin))
    if pool is None:
        pool = pools[str(origin)] = _Pool(origin)
    pool.users += 1
    return pool


def _environment_proxy(origin: URL) -> str | None:
    """The proxy HTTP_PROXY / HTTPS_PROXY / ALL_PROXY name for `origin`, unless NO_PROXY exempts it.

    What httpx2 (the official client's transport) honours; read once per pool, because
    aiohttp's `trust_env` reads the environment again on every request (it doubled the
    client's CPU per call).
    """
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(origin.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(f"{origin.host}:{origin.port}"):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


async def _release(pool: _Pool) -> None:
    pool.users -= 1
    if pool.users > 0:
        return
    pools = _pools.get(asyncio.get_running_loop(), {})
    if pools.get(pool.origin) is pool:
        del pools[pool.origin]
    with anyio.CancelScope(shield=True):
        await pool.http.close()


class LightSession:
    """One worker's calls over the shared pool (see the module docstring). Not a connection of its own."""

    def __init__(
        self, pool: _Pool, url: URL, token: str | None, worker_meta: Mapping[str, Any], refused: TokenRefused
    ) -> None:
        self._pool = pool
        self._url = url
        self._token = token
        self._refused = refused
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": PROTOCOL_VERSION,
        }
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._meta = {**_PROTOCOL_META, **worker_meta}
        self._header_maps = pool.header_maps.setdefault(str(url), {})
        self._closed = False

    @classmethod
    async def open(
        cls,
        url: str,
        token: str | None,
        worker_meta: Mapping[str, Any],
        refused: TokenRefused,
        *,
        probe: bool = True,
    ) -> LightSession | None:
        """Join the pool for `url`'s origin; None if the server does not speak 2026-07-28 (probed once per pool).

        Raises:
            PermissionDenied: the server refused the token (401/429).
            ServiceUnavailable: the server cannot be reached.
        """
        parsed = URL(url)
        pool = _acquire(parsed)
        session = cls(pool, parsed, token, worker_meta, refused)
        try:
            if probe and not await session._speaks_modern():
                await session.close()
                return None
        except BaseException:
            await session.close()
            raise
        return session

    async def close(self) -> None:
        """Leave the pool (its connections close with its last user). Safe to call twice."""
        if not self._closed:
            self._closed = True
            await _release(self._pool)

    async def _speaks_modern(self) -> bool:
        """`server/discover` as `ClientSession.send_discover` sends it, once per pool and token.

        Any JSON-RPC or HTTP-level refusal means "not modern" (the SDK path then probes and
        falls back to the handshake itself); a refused token and an unreachable server raise.
        """
        pool = self._pool
        key = (str(self._url), self._token)
        async with pool.probing:
            known = pool.modern.get(key)
            if known is not None:
                return known
            try:
                with anyio.fail_after(DISCOVER_TIMEOUT):
                    result = await self._post("server/discover", {"_meta": dict(_PROTOCOL_META)})
            except TimeoutError:
                raise ServiceUnavailable(
                    f"the server at {self._url} did not answer server/discover within {DISCOVER_TIMEOUT:g} s"
                ) from None
            except MCPError as exc:
                log.info("%s does not speak %s (%s): using the SDK client", self._url, PROTOCOL_VERSION, exc)
                modern = False
            else:
                versions = result.get("supportedVersions")
                modern = isinstance(versions, list) and PROTOCOL_VERSION in versions
            pool.modern[key] = modern
            return modern

    async def call_tool(
        self, name: str, arguments: dict[str, Any], progress: ProgressCallback | None = None
    ) -> dict[str, Any]:
        """`tools/call`; returns the raw `CallToolResult` object.

        Raises:
            MCPError: the server answered with a JSON-RPC error.
            PermissionDenied: the token was refused.
            ServiceUnavailable: no (well-formed) answer: connection lost, timeout, garbage.
        """
        try:
            return await self._call_once(name, arguments, progress)
        except MCPError as exc:
            if exc.code != HEADER_MISMATCH:
                raise
            # Refused before it ran: our `Mcp-Param-*` headers are missing or stale. The spec's
            # recovery (and the SDK client's): list the tools again, then send once more.
            try:
                await self.list_tools()
            except MCPError:
                raise exc from None
            return await self._call_once(name, arguments, progress)

    async def _call_once(
        self, name: str, arguments: dict[str, Any], progress: ProgressCallback | None
    ) -> dict[str, Any]:
        header_map = self._header_maps.get(name)
        extra = mcp_param_headers(header_map, arguments) if header_map else None
        params = {"name": name, "arguments": arguments, "_meta": self._meta}
        result = await self._post("tools/call", params, name=name, progress=progress, extra_headers=extra)
        kind = result.get("resultType", "complete")
        if kind != "complete":  # e.g. `input_required`: a Sandbox has no sampling/elicitation/roots to answer with
            raise ServiceUnavailable(f"{name}: the server answered resultType {kind!r}; only 'complete' is handled")
        return result

    async def list_tools(self) -> list[dict[str, Any]]:
        """Every page of `tools/list`, minus tools with invalid `x-mcp-header` annotations (a 2026-07-28 MUST)."""
        tools: list[dict[str, Any]] = []
        cursor: str | None = None
        seen: set[str] = set()
        for _ in range(_LIST_PAGE_CAP):
            params: dict[str, Any] = {"_meta": self._meta}
            if cursor is not None:
                params["cursor"] = cursor
            page = await self._post("tools/list", params)
            listed = page.get("tools")
            if not isinstance(listed, list):
                raise ServiceUnavailable(f"tools/list at {self._url}: the answer has no tool list")
            tools.extend(self._absorb(tool) for tool in listed if self._valid_tool(tool))
            cursor = page.get("nextCursor")
            if cursor is None:
                return tools
            if not isinstance(cursor, str) or cursor in seen:
                raise ServiceUnavailable(f"tools/list at {self._url}: the server's pagination does not end")
            seen.add(cursor)
        raise ServiceUnavailable(f"tools/list at {self._url}: more than {_LIST_PAGE_CAP} pages")

    def _valid_tool(self, tool: Any) -> bool:
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise ServiceUnavailable(f"tools/list at {self._url}: a listed tool has no name")
        reason = find_invalid_x_mcp_header(tool.get("inputSchema"))
        if reason is not None:
            log.warning("dropping tool %r: invalid x-mcp-header (%s)", tool["name"], reason)
            self._header_maps.pop(tool["name"], None)
            return False
        return True

    def _absorb(self, tool: dict[str, Any]) -> dict[str, Any]:
        header_map = x_mcp_header_map(tool.get("inputSchema"))
        if header_map:
            self._header_maps[tool["name"]] = header_map
        else:
            self._header_maps.pop(tool["name"], None)
        return tool

    # -- one exchange ----------------------------------------------------------------

    async def _post(
        self,
        method: str,
        params: dict[str, Any],
        *,
        name: str | None = None,
        progress: ProgressCallback | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError("Sandbox is closed")
        request_id = next(self._pool.ids)
        if progress is not None:
            params = {**params, "_meta": {**params["_meta"], "progressToken": request_id}}
        body = orjson.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        headers = {**self._headers, "Mcp-Method": method}
        if name is not None:
            headers["Mcp-Name"] = encode_header_value(name)
        if extra_headers:
            headers.update(extra_headers)
        try:
            async with self._pool.http.post(self._url, data=body, headers=headers, allow_redirects=False) as answer:
                return await self._answer(method, request_id, answer, progress)
        except aiohttp.ClientError as exc:
            raise self._lost(method, exc) from exc

    async def _answer(
        self, method: str, request_id: int, answer: aiohttp.ClientResponse, progress: ProgressCallback | None
    ) -> dict[str, Any]:
        status = answer.status
        if status in (401, 429):
            raise self._refused(status)
        kind = answer.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        detail = ""
        if kind == "application/json":
            message = _decode(method, await _read_capped(answer))
            if status < 400 or isinstance(message.get("error"), dict):
                return _result_of(method, request_id, message, status)
            text = message.get("message")  # e.g. the server's own 503 when it has too many connections
            detail = f": {text}" if isinstance(text, str) else ""
        elif kind == "text/event-stream" and status < 300:
            return await self._events(method, request_id, answer, progress)
        # What `streamable_http_client` makes of an answer that carries no JSON-RPC message.
        if status == 202:
            raise MCPError(INVALID_REQUEST, "server answered a request with 202 Accepted")
        if 300 <= status < 400:
            raise MCPError(INVALID_REQUEST, f"server redirected the request (HTTP {status}); not followed")
        if status == 404:
            raise MCPError(METHOD_NOT_FOUND, "Not Found")
        if status >= 500:  # the server is in trouble: no verdict on the protocol, so never a fallback
            raise ServiceUnavailable(f"{method} at {self._url}: the server answered HTTP {status}{detail}")
        if status >= 400:
            raise MCPError(INTERNAL_ERROR, f"Server returned an error response (HTTP {status}){detail}")
        raise MCPError(INVALID_REQUEST, f"Unexpected content type: {kind or 'none'}")

    async def _events(
        self, method: str, request_id: int, answer: aiohttp.ClientResponse, progress: ProgressCallback | None
    ) -> dict[str, Any]:
        parser = SseParser(MAX_ANSWER_BYTES)
        try:
            async for chunk in answer.content.iter_any():
                for data in parser.feed(chunk):
                    message = _decode(method, data)
                    if "method" not in message:
                        return _result_of(method, request_id, message, answer.status)
                    if message["method"] == "notifications/progress" and progress is not None:
                        await _report(progress, message.get("params"), request_id)
        except EventTooLarge as exc:
            raise ServiceUnavailable(f"{method} at {self._url}: {exc}") from None
        raise ServiceUnavailable(
            f"{method} at {self._url}: the server's event stream ended without an answer "
            "(the call may have run; it is not retried)"
        )

    def _lost(self, method: str, exc: aiohttp.ClientError) -> ServiceUnavailable:
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return ServiceUnavailable(f"cannot reach the server at {self._url}: not connected in {CONNECT_TIMEOUT:g} s")
        if isinstance(exc, aiohttp.ServerTimeoutError):
            what = f"no answer within {READ_TIMEOUT:g} s; the connection was closed, which stops the call"
        elif isinstance(exc, aiohttp.ClientConnectorError):
            return ServiceUnavailable(f"cannot reach the server at {self._url}: {exc.os_error.strerror or exc}")
        else:
            what = f"the connection failed ({type(exc).__name__}: {exc})"
        return ServiceUnavailable(f"{method} at {self._url}: {what}; not retried (the call may have run)")


async def _read_capped(answer: aiohttp.ClientResponse) -> bytes:
    length = answer.content_length
    if length is not None and length <= MAX_ANSWER_BYTES:
        return await answer.read()
    parts: list[bytes] = []
    size = 0
    async for chunk in answer.content.iter_any():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise ServiceUnavailable(f"the server's answer is larger than {MAX_ANSWER_BYTES} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _decode(method: str, data: bytes) -> dict[str, Any]:
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ServiceUnavailable(f"{method}: the server's answer is not JSON: {data[:80]!r}") from None
    if not isinstance(message, dict):
        raise ServiceUnavailable(f"{method}: the server's answer is not a JSON-RPC message: {data[:80]!r}")
    return message


def _result_of(method: str, request_id: int, message: dict[str, Any], status: int) -> dict[str, Any]:
    """The `result` of a JSON-RPC response to `request_id`; its error as `MCPError`."""
    error = message.get("error")
    if error is not None:
        # `id: null` is how a server answers a request whose id it could not read.
        if isinstance(error, dict) and isinstance(error.get("code"), int) and message.get("id") in (request_id, None):
            text = error.get("message")
            raise MCPError(error["code"], text if isinstance(text, str) else "(no message)", error.get("data"))
    elif message.get("id") == request_id and isinstance(result := message.get("result"), dict):
        return result
    raise ServiceUnavailable(f"{method}: malformed answer (HTTP {status}): {orjson.dumps(message)[:120]!r}")


async def _report(progress: ProgressCallback, params: Any, request_id: int) -> None:
    match params:
        case {"progressToken": int() as token, "progress": int() | float() as done} if (
            token == request_id and not isinstance(done, bool)
        ):
            total, message = params.get("total"), params.get("message")
            try:
                await progress(
                    float(done),
                    float(total) if isinstance(total, int | float) else None,
                    message if isinstance(message, str) else None,
                )
            except Exception:  # the caller's callback failing must not fail the call (as in the SDK)
                log.exception("the progress callback raised")
        case _:
            pass
