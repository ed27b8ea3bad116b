"""The session-management meta-tools: `ToolSpec`s in the engine's one tool registry.

Each is one declaration (name, arguments, result, description for an LLM, handler); the
engine lists, validates, times and envelopes them exactly like backend tools. Their
replies are shaped here and only here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from backends.base import ToolSpec
from session.models import SessionView
from session.tool_calls import ToolCall

if TYPE_CHECKING:
    from session.engine import Engine

SESSION_ID_HELP = "The session_id that create_session returned (names one session; works from any connection)."


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
        default=None, description="Resource type(s) whose session to destroy; omit (and session_id) to destroy all."
    )
    session_id: str | None = Field(default=None, description=SESSION_ID_HELP)


class ListSessionsArgs(_Args):
    all: bool = Field(
        default=False,
        description="Also list sessions reachable by session_id that this connection does not own "
        "(every session of your credentials).",
    )


class RefreshArgs(_Args):
    resource: str | None = Field(default=None, description="Resource type to refresh; omit to refresh all.")
    session_id: str | None = Field(default=None, description=SESSION_ID_HELP)


class ReinitializeArgs(_Args):
    resource: str | None = Field(default=None, description="Resource type whose session to replace, e.g. 'bash'.")
    session_id: str | None = Field(default=None, description=SESSION_ID_HELP)
    config: dict[str, Any] | None = Field(default=None, description="Config of the new session.")


class WarmupArgs(_Args):
    resources: str | list[str] | None = Field(default=None, description="Backends to warm; omit for all.")


class CreatedSession(SessionView):
    created: bool


class CreateSessionResult(BaseModel):
    status: str = "success"
    session_id: str | None = Field(None, description="Pass this to every later call to use the session.")
    resource_type: str | None = None
    sessions: list[CreatedSession]
    note: str | None = None


class DestroyResult(BaseModel):
    status: str = "success"
    destroyed: list[SessionView]


class ListResult(BaseModel):
    sessions: list[SessionView]


class RefreshResult(BaseModel):
    status: str = "success"
    refreshed: list[SessionView]


class ReinitializeResult(BaseModel):
    status: str = "success"
    old_session_id: str | None
    new_session_id: str
    session_id: str = Field(description="The new session's id: the old one no longer works.")
    config_applied: dict[str, Any]
    session: dict[str, Any]


class WarmupResult(BaseModel):
    status: str = "success"
    backends: dict[str, str]


class StatusResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: str
    session_ttl: float
    live_sessions: int


async def _create(engine: Engine, call: ToolCall) -> CreateSessionResult:
    args = call.args
    assert isinstance(args, CreateSessionArgs)
    pairs = await engine.create_sessions(call.caller, args.resource, args.config)
    sessions = [CreatedSession(**view.model_dump(), created=created) for view, created in pairs]
    result = CreateSessionResult(sessions=sessions)
    if len(sessions) == 1:
        result.session_id, result.resource_type = sessions[0].session_id, sessions[0].resource_type
        if not sessions[0].created:
            result.note = "you already had that session; it was kept (use reinitialize to change its config)"
    if call.caller.worker is None:
        result.note = (
            "this connection has no lasting identity: pass session_id to every call to use this session"
        )
    return result


async def _destroy(engine: Engine, call: ToolCall) -> DestroyResult:
    args = call.args
    assert isinstance(args, DestroySessionArgs)
    resources = [args.resource] if isinstance(args.resource, str) else args.resource
    views = await engine.destroy_sessions(call.caller, resources, session_id=args.session_id)
    return DestroyResult(destroyed=views)


async def _list(engine: Engine, call: ToolCall) -> ListResult:
    args = call.args
    assert isinstance(args, ListSessionsArgs)
    return ListResult(sessions=engine.list_sessions(call.caller, details=True, everything=args.all))


async def _refresh(engine: Engine, call: ToolCall) -> RefreshResult:
    args = call.args
    assert isinstance(args, RefreshArgs)
    views = engine.refresh_sessions(call.caller, args.resource, session_id=args.session_id)
    return RefreshResult(refreshed=views)


async def _reinitialize(engine: Engine, call: ToolCall) -> ReinitializeResult:
    args = call.args
    assert isinstance(args, ReinitializeArgs)
    out = await engine.reinitialize(call.caller, args.resource, args.config, session_id=args.session_id)
    return ReinitializeResult.model_validate(out)


async def _warmup(engine: Engine, call: ToolCall) -> WarmupResult:
    args = call.args
    assert isinstance(args, WarmupArgs)
    names = [args.resources] if isinstance(args.resources, str) else args.resources
    return WarmupResult(backends=await engine.warmup(names))


async def _status(engine: Engine, call: ToolCall) -> StatusResult:
    return StatusResult.model_validate(engine.status(call.caller))


def _meta(
    name: str,
    description: str,
    args: type[BaseModel],
    result: type[BaseModel],
    handler: Callable[[Engine, ToolCall], Awaitable[BaseModel]],
    *,
    read_only: bool = False,
    destructive: bool = False,
    schema: dict[str, Any] | None = None,
) -> ToolSpec:
    return ToolSpec(
        name=name,
        description=description,
        args_model=args,
        handler=handler,
        result_model=result,
        read_only=read_only,
        destructive=destructive,
        idempotent=read_only,
        owner="engine",
        schema=schema,
    )


def META_TOOLS(engine: Engine) -> list[ToolSpec]:
    """The meta-tools for `engine` (their config schemas name the engine's resources)."""
    return [
        _meta(
            "create_session",
            "Create a persistent session of a resource (e.g. 'bash') and return its session_id. Pass that "
            "session_id to every later tool call that should run in it: state is kept there (a cd in bash "
            "stays, a window stays open). Calls without session_id use your connection's session of that "
            "resource, or else a fresh temporary session destroyed after the call. Sessions expire when idle "
            "for the TTL (see expires_at in every result); each call refreshes it.",
            CreateSessionArgs,
            CreateSessionResult,
            _create,
        ),
        _meta(
            "destroy_session",
            "Destroy a session (by session_id, or your session of a resource, or all your sessions when "
            "neither is given), freeing its processes. Returns what was destroyed.",
            DestroySessionArgs,
            DestroyResult,
            _destroy,
            destructive=True,
        ),
        _meta(
            "list_sessions",
            "List your live sessions: resource_type, session_id, status, session_name, created_at, "
            "expires_at, config, policy, and details of what each holds (processes, display, directories). "
            "Does not refresh them.",
            ListSessionsArgs,
            ListResult,
            _list,
            read_only=True,
        ),
        _meta(
            "refresh_sessions",
            "Keep sessions alive: reset the idle TTL of one session (session_id or resource), or of all yours.",
            RefreshArgs,
            RefreshResult,
            _refresh,
        ),
        _meta(
            "reinitialize",
            "Replace one session (session_id or resource) with a fresh one built from a new config: state is "
            "reset, your other sessions are untouched. Returns a NEW session_id (the old one stops working), "
            "plus old_session_id and config_applied.",
            ReinitializeArgs,
            ReinitializeResult,
            _reinitialize,
            destructive=True,
        ),
        _meta(
            "warmup",
            "Start shared backend processes (e.g. the browser) ahead of first use, so the first call is fast.",
            WarmupArgs,
            WarmupResult,
            _warmup,
        ),
        _meta(
            "get_status",
            "Server status: backends and their tools, whether they are warm, isolation mechanisms, live session "
            "counts, your sessions.",
            _Args,
            StatusResult,
            _status,
            read_only=True,
        ),
    ]
