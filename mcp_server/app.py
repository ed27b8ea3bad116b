"""Build the low-level MCP `Server` over an engine: tool listing, tool calls, lifespan."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import anyio
import mcp_types as t
from mcp.server import Server, ServerRequestContext
from pydantic import ValidationError

from backends.base import Image
from mcp_server.meta_tools import META_TOOLS, refuse_without_worker
from mcp_server.worker_identity import RunScope, WorkerRef, resolve_worker
from session.engine import Engine
from session.envelope import Envelope, ResultMeta, failure, success
from session.errors import ParameterError, SandboxError
from session.validation import describe_validation_error

log = logging.getLogger(__name__)

SERVER_NAME = "agentflow-sandbox"
INSTRUCTIONS = (
    "Stateful sandboxes for agents. Each resource (e.g. bash) has tools named resource_action. "
    "Call create_session(resource) first when you need state kept across calls (a cd, an open window); "
    "otherwise each call runs in a fresh temporary session. Every result is an envelope "
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
        try:
            envelope, images = await dispatch(engine, ctx, params.name, params.arguments or {})
        except Exception as exc:  # the engine returns envelopes; this is the backstop
            envelope, images = failure(exc, ResultMeta(tool=params.name)), []
        return to_result(envelope, images)

    return Server(
        SERVER_NAME,
        version=package_version(),
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
        # Without this the SDK re-lists every tool on each modern-HTTP call to check headers.
        get_tool_input_schema=schemas.get,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


def tool_listing(engine: Engine) -> list[t.Tool]:
    tools: list[t.Tool] = []
    for resource, backend in sorted(engine.backends.items()):
        for spec in backend.tools().values():
            tools.append(
                t.Tool(
                    name=f"{resource}_{spec.name}",
                    description=f"[{resource}] {spec.description}",
                    input_schema=spec.input_schema(),
                    annotations=t.ToolAnnotations(
                        title=f"{resource} {spec.name}",
                        read_only_hint=spec.read_only,
                        destructive_hint=spec.destructive,
                        open_world_hint=spec.open_world,
                    ),
                )
            )
    for meta in META_TOOLS.values():
        schema = meta.args_model.model_json_schema()
        schema.setdefault("properties", {})
        tools.append(
            t.Tool(
                name=meta.name,
                description=meta.description,
                input_schema=schema,
                annotations=t.ToolAnnotations(read_only_hint=meta.read_only, destructive_hint=False),
            )
        )
    return tools


async def dispatch(
    engine: Engine, ctx: ServerRequestContext[RunScope, Any], name: str, arguments: dict[str, Any]
) -> tuple[Envelope, list[Image]]:
    meta_tool = META_TOOLS.get(name)
    started = anyio.current_time()
    meta = ResultMeta(tool=name)
    try:
        worker = resolve_worker(ctx, _closer(engine))
        if meta_tool is None:
            outcome = await engine.call_tool(worker.worker_id, name, arguments, progress=_progress(ctx))
            return outcome.envelope, outcome.images
        envelope = await _run_meta(engine, worker, meta_tool.name, arguments, meta)
    except SandboxError as exc:
        envelope = failure(exc, meta)
    meta.execution_time_ms = round((anyio.current_time() - started) * 1000, 3)
    return envelope, []


async def _run_meta(
    engine: Engine, worker: WorkerRef, name: str, arguments: dict[str, Any], meta: ResultMeta
) -> Envelope:
    tool = META_TOOLS[name]
    try:
        args = tool.args_model.model_validate(arguments)
    except ValidationError as exc:
        raise ParameterError(describe_validation_error(exc, f"arguments of {name}")) from None
    if worker.ephemeral:
        refuse_without_worker(tool)
    return success(await tool.handler(engine, worker.worker_id, args), meta)


def _closer(engine: Engine) -> Any:
    async def close(worker_id: str) -> None:
        # Connection teardown is bounded by the SDK (5 s): detach now, clean up in the engine.
        engine.close_worker_soon(worker_id)

    return close


def _progress(ctx: ServerRequestContext[RunScope, Any]) -> Any:
    async def report(progress: float, total: float | None = None, message: str | None = None) -> None:
        try:
            await ctx.session.report_progress(progress, total, message)
        except Exception:  # progress is advisory; a closed peer must not fail the call
            log.debug("progress notification dropped", exc_info=True)

    return report


def to_result(envelope: Envelope, images: list[Image]) -> t.CallToolResult:
    content: list[t.TextContent | t.ImageContent] = [t.TextContent(type="text", text=envelope.text())]
    content += [
        t.ImageContent(type="image", data=base64.b64encode(image.data).decode("ascii"), mime_type=image.mime_type)
        for image in images
    ]
    return t.CallToolResult(
        content=content,
        structured_content=envelope.model_dump(mode="json"),
        is_error=not envelope.ok,
    )
