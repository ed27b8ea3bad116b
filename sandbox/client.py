"""`Sandbox`: the seed's client API, speaking MCP underneath.

- `Sandbox()` runs the server in-process on the default manifest (nothing to start);
- `Sandbox(url="http://127.0.0.1:18890/mcp")` talks to a running server (`.../sse` for SSE);
- `Sandbox(command=["agentflow-sandbox", "serve"])` spawns one over stdio.

Over HTTP/SSE it sends `Authorization: Bearer <token>`: the `token` argument, else
AGENTFLOW_SANDBOX_TOKEN, else the token file the server generated for the URL's port.
`Sandbox(url=".../mcp")` speaks the 2026-07-28 revision as plain POSTs over connections
shared by every `Sandbox` of the process (`sandbox.light_http`); a server that does not
speak it, `mode="legacy"` and `/sse` URLs get the official SDK client.

One `Sandbox` is one worker: it sends its worker key in every request's `_meta`, so its
sessions hold on every transport and protocol revision, and closing it destroys them.
`execute` returns the result envelope as a dict (a failing tool is data, not an
exception); the session methods return the envelope's `data` and raise
`SandboxError` (with `.code`) on failure. Nothing is ever retried: a command runs once.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import typing
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from os import PathLike
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import urljoin

import anyio
import httpx2
import mcp_types as t
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError

from manifests import load_manifest
from manifests.schema import Manifest
from mcp_server.app import ACTION_META_KEY, RESOURCE_META_KEY, build_server, call_result, run_call, tool_listing
from mcp_server.factory import engine_from_manifest
from mcp_server.tokens import TOKEN_ENV, read_token_file, token_file
from mcp_server.worker_identity import WORKER_META_KEY, worker_key_of
from sandbox.light_http import PROTOCOL_VERSION, LightSession
from session.engine import Engine
from session.errors import ERROR_CLASSES, PermissionDenied, SandboxError, ServiceUnavailable
from session.models import LOCAL_PRINCIPAL, Caller

Resources = str | Sequence[str] | Mapping[str, Mapping[str, Any] | None]
ProgressCallback = Callable[[float, float | None, str | None], Awaitable[None]]


class Sandbox:
    """A worker's handle on a sandbox server; use `async with` or `start()`/`close()`."""

    def __init__(
        self,
        url: str | None = None,
        *,
        command: str | Sequence[str] | None = None,
        manifest: str | PathLike[str] | Manifest | None = None,
        worker_id: str | None = None,
        mode: Literal["auto", "legacy"] | str = "auto",
        env: Mapping[str, str] | None = None,
        token: str | None = None,
    ) -> None:
        if url is not None and command is not None:
            raise ValueError("give either url or command, not both")
        if manifest is not None and (url is not None):
            raise ValueError("manifest applies to an in-process or spawned server, not to url")
        self.url = url
        self.command = command
        self.manifest = manifest
        self.mode = mode
        self.env = dict(env) if env is not None else None
        self.worker_id = worker_id or f"sandbox-{uuid.uuid4().hex}"
        self._meta = typing.cast(t.RequestParamsMeta, {WORKER_META_KEY: self.worker_id})
        self._token = token
        self._owner: asyncio.Task[None] | None = None
        self._closing: anyio.Event | None = None
        self._client: Client | None = None
        self._light: LightSession | None = None
        self._engine: Engine | None = None

    # -- lifetime --------------------------------------------------------------------

    async def start(self) -> Self:
        """Connect (and, for `Sandbox()`, start the in-process server).

        The connection is owned by a task of its own, so any number of `Sandbox` objects
        can be opened and closed in any order from one task: the SDK's task groups must
        be left by the task that entered them, which that task guarantees.
        """
        if self._owner is not None or self._light is not None:
            return self
        if self._light_path():
            assert self.url is not None
            token, origin = _find_token(self.url, self._token)
            url = self.url

            def refused(status: int) -> PermissionDenied:
                return _token_refused(url, status, has_token=bool(token), origin=origin)

            probe = self.mode == "auto"  # a pinned version is adopted without a probe, as the SDK does
            self._light = await LightSession.open(url, token, self._meta, refused, probe=probe)
            if self._light is not None:
                return self
        connected = anyio.Event()
        closing = self._closing = anyio.Event()

        async def own_connection() -> None:
            try:
                async with AsyncExitStack() as stack:
                    if self._direct_path():
                        self._engine = await stack.enter_async_context(engine_from_manifest(self._load_manifest()))
                    else:
                        self._client = await stack.enter_async_context(await self._make_client(stack))
                    connected.set()
                    await closing.wait()
            finally:
                self._client = self._engine = None
                connected.set()

        owner = asyncio.get_running_loop().create_task(own_connection(), name=f"sandbox-{self.worker_id}")
        self._owner = owner
        try:
            await connected.wait()
        except BaseException:
            closing.set()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(owner, return_exceptions=True)
            self._owner = None
            raise
        if self._client is None and self._engine is None:  # connecting failed: re-raise its error here
            self._owner = None
            await owner
            raise RuntimeError("the sandbox connection ended before it was established")
        return self

    def _direct_path(self) -> bool:
        """`Sandbox()` in the default mode: calls go straight to the in-process engine.

        The same `run_call`/`call_result` the MCP handler uses shape every result, so an
        envelope is the one the SDK's in-memory client would return, without its per-call
        dispatch (about half of an in-process `bash_run`). Any explicit `mode` keeps the
        SDK's in-memory client, for tests of the MCP layer itself.
        """
        return self.url is None and self.command is None and self.mode == "auto"

    def _load_manifest(self) -> Manifest:
        return self.manifest if isinstance(self.manifest, Manifest) else load_manifest(self.manifest)

    def _light_path(self) -> bool:
        """Streamable HTTP in the default mode (or pinned to 2026-07-28): plain POSTs, no SDK client."""
        if self.url is None or self.url.rstrip("/").endswith("/sse"):
            return False
        return self.mode in ("auto", PROTOCOL_VERSION)

    async def _make_client(self, stack: AsyncExitStack) -> Client:
        if self.url is not None:
            token, origin = _find_token(self.url, self._token)
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            await _check_token(self.url, headers, origin)
            if self.url.rstrip("/").endswith("/sse"):
                return Client(sse_client(self.url, headers=headers), mode=self.mode)
            http = await stack.enter_async_context(
                httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=300.0))
            )
            return Client(streamable_http_client(self.url, http_client=http), mode=self.mode)
        if self.command is not None:
            argv = shlex.split(self.command) if isinstance(self.command, str) else list(self.command)
            if self.manifest is not None and not isinstance(self.manifest, Manifest):
                argv += ["--manifest", str(self.manifest)]
            params = StdioServerParameters(command=argv[0], args=argv[1:], env=self.env)
            return Client(params, mode=self.mode)
        engine = await stack.enter_async_context(engine_from_manifest(self._load_manifest()))
        return Client(build_server(engine), mode=self.mode)

    async def close(self) -> None:
        """Destroy this worker's sessions and disconnect. Safe to call twice."""
        light, self._light = self._light, None
        if light is not None:
            try:
                await _call_over(light, "destroy_session", {})
            except (SandboxError, MCPError, OSError):
                pass  # the server may already be gone; its TTL cleanup covers it
            finally:
                await light.close()
            return
        owner, self._owner = self._owner, None
        if owner is None:
            return
        try:
            if self._client is not None or self._engine is not None:
                await self._call("destroy_session", {})
        except (SandboxError, MCPError, OSError):
            pass  # the server may already be gone; its disconnect or TTL cleanup covers it
        finally:
            assert self._closing is not None
            self._closing.set()
            with anyio.CancelScope(shield=True):
                await owner

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- the seed's API --------------------------------------------------------------

    async def create_session(self, resource: Resources, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Create a session (or several); later calls of that resource reuse it."""
        return await self._meta_call("create_session", {"resource": _resources(resource), "config": config})

    async def destroy_session(self, resource: str | Sequence[str] | None = None) -> dict[str, Any]:
        """Destroy one resource's session, several, or (no argument) all of this worker's."""
        args = {} if resource is None else {"resource": resource if isinstance(resource, str) else list(resource)}
        return await self._meta_call("destroy_session", args)

    async def execute(
        self, tool: str, params: Mapping[str, Any] | None = None, *, progress: ProgressCallback | None = None
    ) -> dict[str, Any]:
        """Run `resource:action` (e.g. `"bash:run"`); returns the envelope `{code, message, data, meta}`.

        Images (screenshots) are in `data["image"]` as base64 PNG. `progress(done, total,
        message)` is awaited as long calls report progress. To bound the wait, wrap the
        call in `anyio.fail_after(...)`: a cancelled call is stopped on the server (a shell
        command is interrupted) and never retried. The tool's own `timeout` argument, where
        it has one, is the better tool: it returns the partial output.
        """
        return await self._call(tool.replace(":", "_", 1), dict(params or {}), progress=progress)

    async def list_sessions(self) -> dict[str, Any]:
        return await self._meta_call("list_sessions", {})

    async def refresh_sessions(self, resource: str | None = None) -> dict[str, Any]:
        return await self._meta_call("refresh_sessions", {} if resource is None else {"resource": resource})

    async def reinitialize(self, resource: str, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Replace one session with a fresh one from `config`; returns old/new session ids."""
        return await self._meta_call("reinitialize", {"resource": resource, "config": dict(config or {})})

    async def warmup(self, resources: str | Sequence[str] | None = None) -> dict[str, Any]:
        args = {} if resources is None else {"resources": resources if isinstance(resources, str) else list(resources)}
        return await self._meta_call("warmup", args)

    async def get_status(self) -> dict[str, Any]:
        return await self._meta_call("get_status", {})

    async def get_tools(self) -> list[dict[str, Any]]:
        """Every tool: `name` as `execute` takes it (`bash:run`), MCP name, description, schema."""
        if self._light is not None:
            try:
                listed = await self._light.list_tools()
            except MCPError as exc:
                raise ServiceUnavailable(f"tools/list: the server refused the request: {exc}") from exc
        else:
            if self._engine is not None:
                listing = tool_listing(self._engine)
            else:
                listing = (await self._require().list_tools()).tools
            listed = [tool.model_dump(by_alias=True, mode="json", exclude_none=True) for tool in listing]
        tools = []
        for tool in listed:
            meta = tool.get("_meta")
            meta = meta if isinstance(meta, dict) else {}
            resource, action = meta.get(RESOURCE_META_KEY), meta.get(ACTION_META_KEY)
            tools.append(
                {
                    "name": f"{resource}:{action}" if resource and action else tool["name"],
                    "mcp_name": tool["name"],
                    "description": tool.get("description"),
                    "input_schema": tool.get("inputSchema"),
                }
            )
        return tools

    # -- plumbing --------------------------------------------------------------------

    def _require(self) -> Client:
        if self._client is None:
            raise RuntimeError("Sandbox is not started: use 'async with Sandbox() as sandbox' or await start()")
        return self._client

    async def _meta_call(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        envelope = await self._call(name, {k: v for k, v in args.items() if v is not None})
        if envelope.get("code", 5000) != 0:
            cls = ERROR_CLASSES.get(envelope.get("code", 5000), SandboxError)
            raise cls(envelope.get("message", "unknown error"), data=envelope.get("data") or {})
        return envelope.get("data") or {}

    async def _call(
        self, name: str, args: dict[str, Any], *, progress: ProgressCallback | None = None
    ) -> dict[str, Any]:
        if self._light is not None:
            return await _call_over(self._light, name, args, progress)
        if self._engine is not None:
            meta = self._meta
            outcome = await run_call(self._engine, lambda: Caller(LOCAL_PRINCIPAL, _worker(meta)), name, args, progress)
            return _envelope_of_wire(name, call_result(outcome))
        client = self._require()
        try:
            result = await client.call_tool(
                name, args, progress_callback=typing.cast(ProgressFnT | None, progress), meta=self._meta
            )
        except MCPError as exc:
            raise ServiceUnavailable(f"{name}: the server refused the request: {exc}") from exc
        return _envelope_of(name, result)


async def _call_over(
    light: LightSession, name: str, args: dict[str, Any], progress: ProgressCallback | None = None
) -> dict[str, Any]:
    try:
        result = await light.call_tool(name, args, progress)
    except MCPError as exc:
        raise ServiceUnavailable(f"{name}: the server refused the request: {exc}") from exc
    return _envelope_of_wire(name, result)


def _worker(meta: Mapping[str, Any]) -> str | None:
    """The worker an in-process call belongs to: what `resolve_caller` names for the `_meta` key."""
    key = worker_key_of(meta)
    return None if key is None else f"key:{key}"


def _find_token(url: str, explicit: str | None) -> tuple[str | None, str]:
    """The bearer token for `url` and, for error messages, where it came from (never the token)."""
    if explicit:
        return explicit, "the token argument"
    from_env = os.environ.get(TOKEN_ENV, "")
    if from_env:
        return from_env, f"the {TOKEN_ENV} environment variable"
    port = _port_of(url)
    if port is not None:
        found = read_token_file(port)
        if found:
            return found, f"the token file {token_file(port)}"
    where = f"no token file {token_file(port)}" if port is not None else "no port to find a token file by"
    return None, f"none given, {TOKEN_ENV} unset, {where}"


def _port_of(url: str) -> int | None:
    parsed = httpx2.URL(url)
    if parsed.port is not None:
        return parsed.port
    return {"http": 80, "https": 443}.get(parsed.scheme)


async def _check_token(url: str, headers: dict[str, str], origin: str) -> None:
    """Ask the server once, before the MCP client starts, so a refused token is a clear error.

    The SDK's transports report a 401 as a generic HTTP error from inside their task
    groups; one plain request up front turns it into `PermissionDenied` (code 1006).
    """
    # A GET without an MCP session: any answer but 401/429 means the token passed, and none
    # starts anything on the server (for SSE, the message endpoint, not a new stream).
    target = urljoin(url, "messages/") if url.rstrip("/").endswith("/sse") else url
    async with httpx2.AsyncClient(timeout=30.0) as http:
        try:
            async with http.stream("GET", target, headers={**headers, "Accept": "application/json"}) as response:
                status = response.status_code
        except httpx2.HTTPError:
            return  # unreachable: the MCP client reports that in its own words
    if status in (401, 429):
        raise _token_refused(url, status, has_token=bool(headers), origin=origin)


def _token_refused(url: str, status: int, *, has_token: bool, origin: str) -> PermissionDenied:
    problem = f"refused the token from {origin}"
    if not has_token:
        problem = f"requires a bearer token and none was found ({origin})"
    return PermissionDenied(
        f"the server at {url} {problem}. Pass Sandbox(url, token=...), set {TOKEN_ENV}, or, on the "
        "server's machine, let Sandbox read the token file the server wrote for its port"
        + (" (too many refused attempts: retry in a second)" if status == 429 else "")
    )


def _resources(resource: Resources) -> str | list[str] | dict[str, Any]:
    if isinstance(resource, str):
        return resource
    if isinstance(resource, Mapping):
        return {k: (dict(v) if v is not None else None) for k, v in resource.items()}
    return list(resource)


def _envelope_of(name: str, result: t.CallToolResult) -> dict[str, Any]:
    envelope = dict(result.structured_content or {})
    if not envelope:
        text = " ".join(c.text for c in result.content if isinstance(c, t.TextContent))
        envelope = {
            "code": 5000 if result.is_error else 0,
            "message": text or "no structured result",
            "data": {},
            "meta": {"tool": name},
        }
    images = [c for c in result.content if isinstance(c, t.ImageContent)]
    if images:
        data = envelope.setdefault("data", {})
        data["image"] = images[0].data
        data.setdefault("mime_type", images[0].mime_type)
        if len(images) > 1:
            data["images"] = [c.data for c in images]
    return envelope


def _envelope_of_wire(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """`_envelope_of` for a `CallToolResult` as it came over the wire (the light path validates no model)."""
    structured = result.get("structuredContent")
    content = result.get("content", [])
    if not isinstance(content, list) or not all(isinstance(c, dict) for c in content):
        raise ServiceUnavailable(f"{name}: malformed tool result: 'content' is not a list of objects")
    if structured is not None and not isinstance(structured, dict):
        raise ServiceUnavailable(f"{name}: malformed tool result: 'structuredContent' is not an object")
    envelope = dict(structured or {})
    if not envelope:
        text = " ".join(c["text"] for c in content if c.get("type") == "text" and isinstance(c.get("text"), str))
        envelope = {
            "code": 5000 if result.get("isError") else 0,
            "message": text or "no structured result",
            "data": {},
            "meta": {"tool": name},
        }
    images = [c for c in content if c.get("type") == "image" and isinstance(c.get("data"), str)]
    if images:
        data = envelope.setdefault("data", {})
        data["image"] = images[0]["data"]
        data.setdefault("mime_type", images[0].get("mimeType"))
        if len(images) > 1:
            data["images"] = [c["data"] for c in images]
    return envelope
