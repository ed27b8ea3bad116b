"""The backend contract: lifecycle hooks, typed tools, and what a tool returns.

A backend subclasses `Backend`, declares a pydantic `Config` for its session config,
and marks async methods with `@tool`. Which hooks it overrides decides its kind:

- `warmup`/`shutdown` only: *shared* (process-wide state, no sessions; e.g. search);
- `initialize`/`cleanup` only: *session* (one resource per session; e.g. a shell);
- all four: *hybrid* (one shared process, a per-session slice of it; e.g. a browser).
"""

from __future__ import annotations

import enum
import inspect
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

ConfigT = TypeVar("ConfigT", bound=BaseModel)
StateT = TypeVar("StateT")

ProgressFn = Callable[[float, float | None, str | None], Awaitable[None]]


async def _no_progress(progress: float, total: float | None = None, message: str | None = None) -> None:
    return None


class BackendKind(enum.StrEnum):
    SHARED = "shared"
    SESSION = "session"
    HYBRID = "hybrid"


class OpenConfig(BaseModel):
    """Session config of a backend that declares none: any keys, kept as given."""

    model_config = ConfigDict(extra="allow")


class NoArgs(BaseModel):
    """Arguments of a tool that takes none."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True, slots=True)
class Image:
    """An image a tool hands back; the MCP layer sends it as image content."""

    data: bytes
    mime_type: str = "image/png"


@dataclass(slots=True)
class ToolResult:
    """What a tool may return when it has images besides its JSON data.

    A tool may also return a plain dict or a pydantic model: that becomes `data`.
    """

    data: dict[str, Any] | BaseModel = field(default_factory=dict)
    images: list[Image] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ToolContext(Generic[StateT]):
    """What a tool call sees of its session.

    `state` is whatever `initialize` returned (None for shared backends); `config`
    is the validated session config; `progress` reports progress to a caller that
    asked for it (a no-op otherwise).
    """

    worker_id: str
    session_id: str | None
    state: StateT
    config: BaseModel | None = None
    progress: ProgressFn = _no_progress


class SessionInfo(Protocol):
    """What `cleanup` is told about the session it frees."""

    session_id: str
    worker_id: str
    resource_type: str
    state: Any
    config: BaseModel


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One tool: the single declaration its name, schema, docs and handler come from."""

    name: str
    description: str
    args_model: type[BaseModel]
    handler: Callable[..., Awaitable[Any]]
    read_only: bool = False
    destructive: bool = False
    open_world: bool = False
    takes_args: bool = True

    async def invoke(self, backend: Backend[Any, Any], ctx: ToolContext[Any], args: BaseModel) -> Any:
        if self.takes_args:
            return await self.handler(backend, ctx, args)
        return await self.handler(backend, ctx)

    def input_schema(self) -> dict[str, Any]:
        schema = self.args_model.model_json_schema()
        schema.setdefault("type", "object")
        schema.setdefault("properties", {})
        return schema


_TOOL_ATTR = "__agentflow_tool__"


def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    read_only: bool = False,
    destructive: bool = False,
    open_world: bool = False,
) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Declare a backend method as a tool.

    The method is `async def name(self, ctx: ToolContext[State], args: ArgsModel)`;
    the `args` annotation (a pydantic model, or omitted for no arguments) gives the
    JSON Schema, and the description (or the docstring) is what an LLM reads.
    """

    def decorate(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@tool {fn.__qualname__} must be an async def")
        hints = typing.get_type_hints(fn)
        args_model = hints.get("args", NoArgs)
        if not (isinstance(args_model, type) and issubclass(args_model, BaseModel)):
            raise TypeError(f"@tool {fn.__qualname__}: 'args' must be annotated with a pydantic model")
        doc = description or inspect.cleandoc(fn.__doc__ or "")
        if not doc:
            raise TypeError(f"@tool {fn.__qualname__} needs a description (an LLM reads it)")
        spec = ToolSpec(
            name=name or fn.__name__.rstrip("_"),
            description=doc,
            args_model=args_model,
            handler=fn,
            read_only=read_only,
            destructive=destructive,
            open_world=open_world,
            takes_args="args" in inspect.signature(fn).parameters,
        )
        setattr(fn, _TOOL_ATTR, spec)
        return fn

    return decorate


class Backend(Generic[ConfigT, StateT]):
    """Base of every backend. Override only the hooks the resource needs.

    `defaults` is the manifest's `resources.<name>.config`: backend-wide settings and
    the defaults every session config is merged over.
    """

    description: ClassVar[str] = ""
    Config: ClassVar[type[BaseModel]] = OpenConfig
    _tools: ClassVar[dict[str, ToolSpec]] = {}

    def __init__(self, name: str, defaults: dict[str, Any] | None = None) -> None:
        self.name = name
        self.defaults: dict[str, Any] = dict(defaults or {})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        tools: dict[str, ToolSpec] = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                spec = getattr(attr, _TOOL_ATTR, None)
                if isinstance(spec, ToolSpec):
                    tools[spec.name] = spec
        cls._tools = tools

    # -- declared surface ------------------------------------------------------------

    @classmethod
    def kind(cls) -> BackendKind:
        per_session = cls.initialize is not Backend.initialize
        shared = cls.warmup is not Backend.warmup
        if per_session and shared:
            return BackendKind.HYBRID
        return BackendKind.SESSION if per_session else BackendKind.SHARED

    @classmethod
    def tools(cls) -> dict[str, ToolSpec]:
        return cls._tools

    def session_config(self, overrides: dict[str, Any] | None = None) -> BaseModel:
        """Validate the manifest defaults merged with a session's own config.

        Raises:
            pydantic.ValidationError: a key is unknown or a value is wrong.
        """
        return self.Config.model_validate({**self.defaults, **(overrides or {})})

    # -- lifecycle hooks (all optional) ----------------------------------------------

    async def warmup(self) -> None:
        """Start process-wide state (a model, a browser). Runs once, on first use if not before."""

    async def shutdown(self) -> None:
        """Stop process-wide state. Runs at server shutdown, after every session is gone."""

    async def initialize(self, worker_id: str, config: ConfigT) -> StateT:
        """Create one session's resource and return its state (handed to tools as `ctx.state`)."""
        raise NotImplementedError

    async def cleanup(self, worker_id: str, session_info: SessionInfo) -> None:
        """Free one session's resource. `session_info.state` is what `initialize` returned."""

    def describe(self, state: StateT) -> dict[str, Any]:
        """What a session holds, for `list_sessions` (its processes, display, temp dir...).

        Called on listing only; keep it cheap and never raise.
        """
        return {}

    async def health(self, state: StateT) -> str | None:
        """Say what is wrong with a session's resource, or None if it is usable.

        Called before each tool call; a message here fails the call with a session
        error (1003) instead of letting it hang on a dead process.
        """
        return None
