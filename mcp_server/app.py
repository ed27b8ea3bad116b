"""Build the low-level MCP `Server` over an engine: tool listing, tool calls, lifespan."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any, cast

import mcp_types as t
from mcp.server import Server, ServerRequestContext
from mcp.server._otel import OpenTelemetryMiddleware
from mcp.shared.jsonrpc_dispatcher import progress_token_from_params
from opentelemetry import trace

from backends.base import BackendKind, ProgressFn
from backends.policy import Policy
from mcp_server.schemas import portable_schema, with_session_configs
from mcp_server.worker_identity import RunScope, resolve_caller
from session.engine import Engine
from session.envelope import ResultMeta, failure
from session.errors import SandboxError
from session.models import Caller
from session.tool_calls import CallOutcome

log = logging.getLogger(__name__)

SERVER_NAME = "agentflow-sandbox"
#: Tool `_meta` keys: the resource a tool belongs to (null for session tools) and its action.
RESOURCE_META_KEY = "agentflow/resource"
ACTION_META_KEY = "agentflow/action"
INSTRUCTIONS = (
    "Stateful sandboxes for agents. Each resource (e.g. bash) has tools named resource_action. "
    "Call create_session(resource) first when you need state kept across calls (a cd, an open window), and "
    "pass the session_id it returns to every later call; otherwise each call runs in a fresh temporary "
    "session. Every result is an envelope "
    "{code, message, data, meta}: code 0 is success; meta.expires_at says when an idle session is reaped."
)


def package_version() -> str:
    try:
        return version("agentflow-sandbox")
    except PackageNotFoundError:
        return "0.0.0"


def build_server(engine: Engine) -> Server[RunScope]:
    """The MCP server for `engine`; many connections (and transports) may share it."""

    @asynccontextmanager
    async def lifespan(_: Server[RunScope]) -> AsyncIterator[RunScope]:
        async with AsyncExitStack() as stack:
            yield RunScope(exit_stack=stack)

    # The catalog is static for a server's life: build the schemas once, not per request.
    tools = tool_listing(engine)
    schemas = {tool.name: tool.input_schema for tool in tools}

    async def list_tools(
        ctx: ServerRequestContext[RunScope, Any], params: t.PaginatedRequestParams | None
    ) -> t.ListToolsResult:
        return t.ListToolsResult(tools=tools)

    async def call_tool(ctx: ServerRequestContext[RunScope, Any], params: t.CallToolRequestParams) -> t.CallToolResult:
        # The ray executor streams a call only when its progress can reach the client: a request
        # with a progress token (in-process clients, whose callbacks need none, are always local).
        wants_progress = isinstance(engine, Engine) or progress_token_from_params(ctx.params) is not None
        outcome = await run_call(
            engine,
            lambda: resolve_caller(ctx, engine.disconnect),
            params.name,
            params.arguments,
            _progress(ctx) if wants_progress else None,
        )
        # The runner takes a wire-form dict as well as the model (and validates either against the
        # protocol version's surface); the annotation names only the model.
        return cast(t.CallToolResult, call_result(outcome))

    server = Server(
        SERVER_NAME,
        version=package_version(),
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
        # Without this the SDK re-lists every tool on each modern-HTTP call to check headers.
        get_tool_input_schema=schemas.get,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )
    drop_idle_tracing(server)
    return server


def drop_idle_tracing(server: Server[Any]) -> None:
    """Remove the SDK's OpenTelemetry middleware when no tracer provider is installed.

    The SDK wraps every request in a span; with only the OpenTelemetry API present (the
    global provider is the API's default proxy) each span is recorded nowhere, yet costs
    attribute dicts, context extraction and a context-manager frame per call. A process
    that installs a provider before building the server (auto-instrumentation does) keeps it.
    """
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        server.middleware[:] = [m for m in server.middleware if not isinstance(m, OpenTelemetryMiddleware)]


#: Meta-tools whose `config` argument is a resource's session config.
_CONFIG_TOOLS = frozenset({"create_session", "reinitialize"})


def session_config_schemas(engine: Engine) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Each session resource's config schema, and the keys every config also accepts
    (`custom_name` and the policy requests, which the engine reads before the backend's model)."""
    configs = {
        name: backend.Config.model_json_schema()
        for name, backend in sorted(engine.backends.items())
        if backend.kind() is not BackendKind.SHARED
    }
    policy = Policy.model_json_schema()
    defs = policy.get("$defs", {})
    common: dict[str, dict[str, Any]] = {
        "custom_name": {"type": "string", "description": "A label kept on the session."}
    }
    for key in sorted(Policy.REQUEST_KEYS):
        prop = dict(policy["properties"][key])
        prop.pop("default", None)
        prop["description"] = f"Policy request (may only tighten the operator's policy): {prop.get('description', '')}"
        common[key] = {**prop, "$defs": defs} if defs else prop
    return configs, common


def tool_listing(engine: Engine) -> list[t.Tool]:
    """Every tool of the engine's one registry, as MCP tools; `_meta` says which resource owns it.

    Schemas are rewritten into the subset every common client accepts (`mcp_server.schemas`);
    `create_session` and `reinitialize` show each resource's config fields.
    """
    configs, common = session_config_schemas(engine)
    tools: list[t.Tool] = []
    for spec in engine.catalog.values():
        if spec.owner == "engine" and spec.name in _CONFIG_TOOLS:
            schema = with_session_configs(spec.input_schema(), configs, common_properties=common)
        else:
            schema = portable_schema(spec.input_schema())
        title = f"{spec.resource} {spec.name}" if spec.resource else spec.name.replace("_", " ")
        tools.append(
            t.Tool(
                name=spec.qualified_name,
                description=spec.description,
                input_schema=schema,
                annotations=t.ToolAnnotations(
                    title=title,
                    read_only_hint=spec.read_only,
                    destructive_hint=spec.destructive,
                    idempotent_hint=spec.idempotent,
                    open_world_hint=spec.open_world,
                ),
                _meta={RESOURCE_META_KEY: spec.resource, ACTION_META_KEY: spec.name},
            )
        )
    return tools


def _progress(ctx: ServerRequestContext[RunScope, Any]) -> ProgressFn:
    async def report(progress: float, total: float | None = None, message: str | None = None) -> None:
        try:
            await ctx.session.report_progress(progress, total, message)
        except Exception:  # progress is advisory; a closed peer must not fail the call
            log.debug("progress notification dropped", exc_info=True)

    return report


async def run_call(
    engine: Engine,
    resolve: Callable[[], Caller],
    name: str,
    arguments: Mapping[str, Any] | None,
    progress: ProgressFn | None,
) -> CallOutcome:
    """One tool call, from its caller to its outcome: the SDK handler and the HTTP fast path
    (`mcp_server.fast_calls`) both come through here, so they cannot drift apart."""
    try:
        caller = resolve()
    except SandboxError as exc:
        return CallOutcome(failure(exc, ResultMeta(tool=name[:128])))
    try:
        return await engine.call(caller, name, arguments or {}, progress=progress)
    except Exception as exc:  # the engine returns envelopes; this is the backstop
        return CallOutcome(failure(exc, ResultMeta(tool=name[:128])))


def call_result(outcome: CallOutcome) -> dict[str, Any]:
    """The `CallToolResult` of an outcome in its wire form: camelCase keys, in the order the
    SDK's result sieve writes them, so the sieve (which the SDK's handler path applies) gives
    it back unchanged and the HTTP fast path can send it as is (a test holds both to that)."""
    envelope = outcome.envelope
    content: list[dict[str, Any]] = [{"text": outcome.text(), "type": "text"}]
    content += [
        {"data": base64.b64encode(image.data).decode("ascii"), "mimeType": image.mime_type, "type": "image"}
        for image in outcome.images
    ]
    return {
        "content": content,
        "isError": not envelope.ok,
        # What the model's dump carries; the handshake era's surface drops it.
        "resultType": "complete",
        "structuredContent": outcome.structured(),
    }
