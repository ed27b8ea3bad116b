"""The session-management meta-tools, one declaration each (name, arguments, docs, handler)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from session.engine import Engine
from session.errors import WorkerNotFound

Handler = Callable[[Engine, str, Any], Awaitable[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class MetaTool:
    name: str
    description: str
    args_model: type[BaseModel]
    handler: Handler
    read_only: bool = False
    needs_worker: bool = False
    """Refused when the caller has no worker identity (its sessions could never be used again)."""


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateSessionArgs(_Args):
    resource: str | list[str] | dict[str, dict[str, Any] | None] = Field(
        description="A resource type ('bash'), a list (['bash', 'vm']) or a mapping type -> config."
    )
    config: dict[str, Any] | None = Field(
        default=None,
        description="Config for a single resource, e.g. {'cwd': '/tmp'} for bash; 'custom_name' labels it.",
    )


class DestroySessionArgs(_Args):
    resource: str | list[str] | None = Field(
        default=None, description="Resource type(s) whose session to destroy; omit to destroy all of yours."
    )


class RefreshArgs(_Args):
    resource: str | None = Field(default=None, description="Resource type to refresh; omit to refresh all.")


class ReinitializeArgs(_Args):
    resource: str = Field(description="Resource type whose session to replace, e.g. 'bash'.")
    config: dict[str, Any] | None = Field(default=None, description="Config of the new session.")


class WarmupArgs(_Args):
    resources: str | list[str] | None = Field(default=None, description="Backends to warm; omit for all.")


async def _create(engine: Engine, worker: str, args: CreateSessionArgs) -> dict[str, Any]:
    pairs = await engine.create_sessions(worker, args.resource, args.config)
    sessions = [{**view.model_dump(), "created": created} for view, created in pairs]
    data: dict[str, Any] = {"status": "success", "sessions": sessions}
    if len(sessions) == 1:
        data.update(session_id=sessions[0]["session_id"], resource_type=sessions[0]["resource_type"])
        if not sessions[0]["created"]:
            data["note"] = "this worker already had that session; it was kept (use reinitialize to change config)"
    return data


async def _destroy(engine: Engine, worker: str, args: DestroySessionArgs) -> dict[str, Any]:
    resources = [args.resource] if isinstance(args.resource, str) else args.resource
    views = await engine.destroy_sessions(worker, resources)
    return {"status": "success", "destroyed": [v.model_dump() for v in views]}


async def _list(engine: Engine, worker: str, args: _Args) -> dict[str, Any]:
    return {"sessions": [v.model_dump() for v in engine.list_sessions(worker, details=True)]}


async def _refresh(engine: Engine, worker: str, args: RefreshArgs) -> dict[str, Any]:
    views = engine.refresh_sessions(worker, args.resource)
    return {"status": "success", "refreshed": [v.model_dump() for v in views]}


async def _reinitialize(engine: Engine, worker: str, args: ReinitializeArgs) -> dict[str, Any]:
    return await engine.reinitialize(worker, args.resource, args.config)


async def _warmup(engine: Engine, worker: str, args: WarmupArgs) -> dict[str, Any]:
    names = [args.resources] if isinstance(args.resources, str) else args.resources
    return {"status": "success", "backends": await engine.warmup(names)}


async def _status(engine: Engine, worker: str, args: _Args) -> dict[str, Any]:
    return engine.status(worker)


META_TOOLS: dict[str, MetaTool] = {
    tool.name: tool
    for tool in (
        MetaTool(
            "create_session",
            "Create a persistent session of a resource (e.g. 'bash') for you. Later calls of that resource's "
            "tools run in it and keep state (a cd in bash stays). Without one, each tool call gets a fresh "
            "temporary session that is destroyed after the call. Sessions expire when idle for the TTL "
            "(see expires_at in every result); any tool call refreshes it. Returns the session_id.",
            CreateSessionArgs,
            _create,
            needs_worker=True,
        ),
        MetaTool(
            "destroy_session",
            "Destroy your session of a resource (or all your sessions when no resource is given), freeing "
            "its processes. Returns what was destroyed.",
            DestroySessionArgs,
            _destroy,
        ),
        MetaTool(
            "list_sessions",
            "List your live sessions: resource_type, session_id, status, session_name, created_at, "
            "expires_at, config, and details of what each holds (processes, display, directories). "
            "Does not refresh them.",
            _Args,
            _list,
            read_only=True,
        ),
        MetaTool(
            "refresh_sessions",
            "Keep your sessions alive: reset the idle TTL of one resource's session, or of all your sessions.",
            RefreshArgs,
            _refresh,
        ),
        MetaTool(
            "reinitialize",
            "Replace your session of one resource with a fresh one built from a new config (state is reset; "
            "your other sessions are untouched). Returns old_session_id, new_session_id, config_applied.",
            ReinitializeArgs,
            _reinitialize,
            needs_worker=True,
        ),
        MetaTool(
            "warmup",
            "Start shared backend processes (e.g. the browser) ahead of first use, so the first call is fast.",
            WarmupArgs,
            _warmup,
        ),
        MetaTool(
            "get_status",
            "Server status: backends and their tools, whether they are warm, live session counts, your sessions.",
            _Args,
            _status,
            read_only=True,
        ),
    )
}


def refuse_without_worker(tool: MetaTool) -> None:
    """Raise if `tool` makes no sense for a caller with no worker identity."""
    if tool.needs_worker:
        raise WorkerNotFound(
            f"{tool.name}: this request has no worker identity (stateless HTTP without a session), so a "
            "session could never be used again. Send a worker key in the request _meta under "
            "'agentflow/worker_id', or connect with an MCP session (stdio, SSE, or HTTP with Mcp-Session-Id). "
            "Tool calls without a session still work: each runs in a temporary session."
        )
