"""The backend contract (v2): lifecycle hooks, typed tools, and what a tool returns.

A backend subclasses `Backend[ConfigT, StateT]` and declares:

- `Config`: the pydantic model of one session's config (the manifest's
  `resources.NAME.config` gives defaults; a client's `create_session` config is merged over);
- `Settings`: the pydantic model of backend-wide settings (manifest `resources.NAME.settings`;
  one value for the whole server, never chosen by a client);
- async methods marked `@tool`, each `async def action(self, ctx: ToolContext[ConfigT, StateT],
  args: ArgsModel) -> ResultModel` (or `ToolResult[ResultModel]` when it returns images).

Which hooks it overrides decides its kind:

- `warmup`/`shutdown` only: *shared* (process-wide state, no sessions; e.g. search);
- `initialize`/`cleanup` only: *session* (one resource per session; e.g. a shell);
- all four: *hybrid* (one shared process, a per-session slice of it; e.g. a browser).

The engine owns everything around the hooks: config validation, the operator's policy
(`backends.policy`), each session's scratch directory (made before `initialize`, removed
after `cleanup`), timing and the result envelope. Backends never override that plumbing.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import logging
import os
import secrets
import tempfile
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from backends.policy import Policy
from session.errors import ParameterError
from session.validation import describe_validation_error

log = logging.getLogger(__name__)

ConfigT = TypeVar("ConfigT", bound=BaseModel)
StateT = TypeVar("StateT")
ResultT = TypeVar("ResultT", bound=BaseModel)

ProgressFn = Callable[[float, float | None, str | None], Awaitable[None]]


async def no_progress(progress: float, total: float | None = None, message: str | None = None) -> None:
    """The progress reporter of a caller that did not ask for progress."""
    return None


class BackendKind(enum.StrEnum):
    SHARED = "shared"
    SESSION = "session"
    HYBRID = "hybrid"


class OpenConfig(BaseModel):
    """Session config of a backend that declares none: any keys, kept as given."""

    model_config = ConfigDict(extra="allow")


class NoSettings(BaseModel):
    """Backend-wide settings of a backend that has none."""

    model_config = ConfigDict(extra="forbid")


class NoArgs(BaseModel):
    """Arguments of a tool that takes none."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True, slots=True)
class Image:
    """An image a tool hands back; the MCP layer sends it as image content."""

    data: bytes
    mime_type: str = "image/png"


@dataclass(slots=True)
class ToolResult(Generic[ResultT]):
    """A tool's result model plus images (screenshots) to send beside it."""

    data: ResultT
    images: list[Image] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Runtime:
    """What the engine lends every backend: where scratch files go, and who the server is.

    `scratch_root` is private to this server process; every session's scratch directory
    is made under it by the engine, and backend-wide files (a browser profile) go there too.
    """

    scratch_root: Path
    server_id: str

    @classmethod
    def for_process(cls) -> Runtime:
        """This process's runtime: `<tmp>/agentflow-<server_id>`, server id `<run>-<pid>-<random>`.

        The run prefix comes from `AGENTFLOW_RUN_ID` (tests set it, so what a run leaves
        behind is recognisable); the pid lets a later server tell a dead owner's leftovers.
        """
        global _PROCESS_RUNTIME
        if _PROCESS_RUNTIME is None or _PROCESS_RUNTIME.pid != os.getpid():
            run = os.environ.get("AGENTFLOW_RUN_ID") or "srv"
            server_id = f"{run}-{os.getpid()}-{secrets.token_hex(3)}"
            _PROCESS_RUNTIME = cls(Path(tempfile.gettempdir()) / f"agentflow-{server_id}", server_id)
        return _PROCESS_RUNTIME

    @property
    def pid(self) -> int:
        """The pid of the server that owns this runtime (the middle field of `server_id`)."""
        return int(self.server_id.rsplit("-", 2)[-2])


_PROCESS_RUNTIME: Runtime | None = None


@dataclass(frozen=True, slots=True)
class SessionSetup(Generic[ConfigT]):
    """What `initialize` and `cleanup` are told about one session.

    `session_id` is a capability: never log it, put it in a path, or hand it to a
    process. `label` is the short, loggable, path-safe name of the session.
    """

    worker_id: str
    session_id: str
    label: str
    resource: str
    config: ConfigT
    policy: Policy
    scratch: Path
    links: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Config fields naming another session of the same principal (see `Backend.links`),
    resolved to what that session's backend `export`s."""
    pooled: bool = False
    """Started for the warm pool, before anyone asked for it: a backend may start it at a
    background CPU priority, and restore the priority in `Backend.handed_out`."""


@dataclass(frozen=True, slots=True)
class ToolContext(Generic[ConfigT, StateT]):
    """What a tool call sees: its session's validated config, state and policy.

    For a shared backend `session` is None and `state` is None.
    """

    config: ConfigT
    state: StateT
    session: SessionSetup[ConfigT] | None = None
    progress: ProgressFn = no_progress

    @property
    def worker_id(self) -> str | None:
        return self.session.worker_id if self.session else None


ToolOwner = Literal["backend", "engine"]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One tool: the single declaration its name, schemas, docs and handler come from.

    Backend tools are declared with `@tool` and bound to their resource name by the
    engine's registry (`bound`); the session-management meta-tools are `ToolSpec`s with
    `owner="engine"` and no resource. Both travel the same listing, validation and
    timing path.
    """

    name: str
    description: str
    args_model: type[BaseModel]
    handler: Callable[..., Awaitable[Any]]
    result_model: type[BaseModel] | None = None
    read_only: bool = False
    destructive: bool = False
    idempotent: bool = False
    open_world: bool = False
    takes_args: bool = True
    owner: ToolOwner = "backend"
    resource: str | None = None
    takes_session: bool = False
    """True when the tool accepts a `session_id` naming the session to use."""
    schema: dict[str, Any] | None = None
    """A JSON Schema to list instead of the args model's (e.g. typed per-resource configs)."""

    @property
    def qualified_name(self) -> str:
        """The MCP tool name: `resource_action` for backend tools, the bare name for meta-tools."""
        return f"{self.resource}_{self.name}" if self.resource else self.name

    def bound(self, resource: str, *, takes_session: bool) -> ToolSpec:
        return dataclasses.replace(self, resource=resource, takes_session=takes_session)

    def input_schema(self) -> dict[str, Any]:
        """The arguments' JSON Schema, with `session_id` declared where the tool takes one."""
        schema = dict(self.schema) if self.schema is not None else self.args_model.model_json_schema()
        schema.setdefault("type", "object")
        properties = schema.setdefault("properties", {})
        if self.takes_session and "session_id" not in properties:
            properties["session_id"] = {
                "type": "string",
                "description": (
                    "The session_id that create_session returned: run in that session (state kept). "
                    "Omit to use your own session of this resource, or a temporary one."
                ),
            }
        return schema


_TOOL_ATTR = "__agentflow_tool__"

HandlerT = TypeVar("HandlerT", bound=Callable[..., Awaitable[Any]])


def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    read_only: bool = False,
    destructive: bool = False,
    idempotent: bool = False,
    open_world: bool = False,
) -> Callable[[HandlerT], HandlerT]:
    """Declare a backend method as a tool.

    The method is `async def name(self, ctx: ToolContext[Config, State], args: ArgsModel)
    -> ResultModel`; the `args` annotation (a pydantic model, or omitted for no
    arguments) gives the JSON Schema, the return annotation the result model, and the
    description (or the docstring) is what an LLM reads.
    """

    def decorate(fn: HandlerT) -> HandlerT:
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
            result_model=_result_model(hints.get("return")),
            read_only=read_only,
            destructive=destructive,
            idempotent=idempotent or read_only,
            open_world=open_world,
            takes_args="args" in inspect.signature(fn).parameters,
        )
        setattr(fn, _TOOL_ATTR, spec)
        return typing.cast(HandlerT, fn)

    return decorate


def _result_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) is ToolResult:
        (inner,) = typing.get_args(annotation) or (None,)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return None


class Backend(Generic[ConfigT, StateT]):
    """Base of every backend. Override only the lifecycle hooks the resource needs.

    The constructor is the engine's: `settings` are the manifest's backend-wide settings,
    `defaults` its per-session config defaults, `policy` the operator's policy for this
    resource, `runtime` the scratch root and server identity.
    """

    description: ClassVar[str] = ""
    Config: ClassVar[type[BaseModel]] = OpenConfig
    Settings: ClassVar[type[BaseModel]] = NoSettings
    #: The policy a resource gets when the manifest says nothing (the browser reaches the internet).
    default_policy: ClassVar[Policy] = Policy()
    #: Isolation tiers this backend can provide (asking for another is a configuration error).
    isolation_tiers: ClassVar[frozenset[str]] = frozenset({"none", "sandbox", "gvisor"})
    #: Config fields whose value is the handle of another session of the same principal,
    #: by resource type (the browser's `display` names a vm session): the engine checks
    #: the handle and passes that session's `export` in `SessionSetup.links`.
    links: ClassVar[dict[str, str]] = {}
    _tools: ClassVar[dict[str, ToolSpec]] = {}

    def __init__(
        self,
        name: str,
        *,
        settings: Mapping[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
        policy: Policy | None = None,
        runtime: Runtime | None = None,
    ) -> None:
        self.name = name
        self.runtime = runtime if runtime is not None else Runtime.for_process()
        self.policy = policy if policy is not None else self.default_policy
        defaults = dict(defaults or {})
        settings = dict(settings or {})
        # Backend-wide keys once lived in `config`: keep such manifests working.
        for key in list(defaults):
            if key in self.Settings.model_fields and key not in self.Config.model_fields:
                log.warning(
                    "resources.%s.config.%s is a backend-wide setting: move it to resources.%s.settings",
                    name,
                    key,
                    name,
                )
                settings.setdefault(key, defaults.pop(key))
        self.defaults: dict[str, Any] = defaults
        self.settings: BaseModel = self.Settings.model_validate(settings)

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

    def session_config(self, overrides: Mapping[str, Any] | None = None) -> ConfigT:
        """Validate the manifest defaults merged with a session's own config (policy keys removed).

        Raises:
            ParameterError: a key is unknown or a value is wrong (1002, naming the field).
        """
        overrides = dict(overrides or {})
        settings_only = self.Settings.model_fields.keys() - self.Config.model_fields.keys()
        misplaced = sorted(k for k in overrides if k in settings_only)
        if misplaced:
            raise ParameterError(
                f"{', '.join(misplaced)}: backend-wide setting(s) of {self.name!r}, fixed by the operator in the "
                f"manifest (resources.{self.name}.settings); a session cannot change them"
            )
        try:
            return typing.cast(ConfigT, self.Config.model_validate({**self.defaults, **overrides}))
        except ValidationError as exc:
            raise ParameterError(
                describe_validation_error(exc, f"config of {self.name!r}"),
                data={"config_schema": self.Config.model_json_schema()},
            ) from None

    # -- lifecycle hooks (all optional) ----------------------------------------------

    async def warmup(self) -> None:
        """Start process-wide state (a model, a browser). Runs once, on first use if not before."""

    async def shutdown(self) -> None:
        """Stop process-wide state. Runs at server shutdown, after every session is gone."""

    async def initialize(self, setup: SessionSetup[ConfigT]) -> StateT:
        """Create one session's resource and return its state (handed to tools as `ctx.state`).

        `setup.scratch` is the session's private directory (the engine removes it after
        `cleanup`); `setup.policy` is the policy in force (isolation, network, limits).
        """
        raise NotImplementedError

    async def kill(self, setup: SessionSetup[ConfigT], state: StateT) -> bool:
        """Stop every process of the session at once (SIGKILL), without waiting for them.

        Return True when done: the engine then answers the destroy (or the temporary call)
        and runs `cleanup` in the background, bounded and tracked. The default returns False:
        `cleanup` runs before the destroy returns.
        """
        return False

    async def cleanup(self, setup: SessionSetup[ConfigT], state: StateT) -> None:
        """Free one session's resource: every process it started must be gone on return."""

    async def handed_out(self, state: StateT) -> None:
        """A warm-pool session (`SessionSetup.pooled`) was given to a caller; runs before its first call.

        A backend that started it at a background priority restores the normal one here.
        Keep it quick: the caller's `create_session` or temporary call waits for it.
        """

    def export(self, state: StateT) -> dict[str, Any]:
        """What another session of the same principal may use of this one (see `links`)."""
        return {}

    def describe(self, state: StateT) -> dict[str, Any]:
        """What a session holds, for `list_sessions` (its processes, display...).

        Called on listing only; keep it cheap and never raise.
        """
        return {}

    async def health(self, state: StateT) -> str | None:
        """Say what is wrong with a session's resource, or None if it is usable.

        Called before each tool call; a message here fails the call with a session
        error (1003) instead of letting it hang on a dead process.
        """
        return None

    def status(self) -> dict[str, Any]:
        """Backend-wide facts for `get_status` (e.g. which isolation mechanisms are active)."""
        return {}
