"""A small in-process backend implementing the real `Backend` contract, for engine tests.

It records every hook call, and can be told to stall (on an `anyio.Event`) or fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio
from pydantic import BaseModel, ConfigDict, Field

from backends.base import Backend, Image, SessionSetup, ToolContext, ToolResult, tool


class FakeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = "default"
    init_delay: float = 0.0
    fail_init: bool = False


@dataclass
class FakeState:
    label: str
    values: dict[str, Any] = field(default_factory=dict)
    running: int = 0
    max_running: int = 0
    order: list[int] = field(default_factory=list)
    broken: str | None = None


class SetArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str
    value: int


class GetArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str


class WorkArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seq: int = 0
    seconds: float = Field(default=0.0, ge=0)


class Stored(BaseModel):
    stored: str


class Value(BaseModel):
    value: int | None
    label: str


class Worked(BaseModel):
    seq: int
    session: str | None


class Size(BaseModel):
    width: int
    height: int


class Echo(BaseModel):
    echo: str
    warmups: int


class Text(BaseModel):
    text: str


class FakeBackend(Backend[FakeConfig, FakeState]):
    """A session backend whose state is a dict."""

    Config = FakeConfig

    def __init__(self, name: str = "fake", defaults: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(name, defaults=defaults, **kwargs)
        self.events: list[tuple[str, str]] = []
        self.live: set[int] = set()
        self.gate: anyio.Event | None = None
        #: `work` calls running now, over all sessions (observable from outside the engine).
        self.working = 0

    async def initialize(self, setup: SessionSetup[FakeConfig]) -> FakeState:
        config = setup.config
        self.events.append(("initialize", setup.worker_id))
        if config.init_delay:
            await anyio.sleep(config.init_delay)
        if self.gate is not None and config.label == "gated":
            await self.gate.wait()
        if config.fail_init:
            raise RuntimeError("init exploded")
        state = FakeState(label=config.label)
        self.live.add(id(state))
        return state

    async def cleanup(self, setup: SessionSetup[FakeConfig], state: FakeState) -> None:
        self.events.append(("cleanup", setup.worker_id))
        self.live.discard(id(state))

    async def health(self, state: FakeState) -> str | None:
        return state.broken

    @tool(description="Store a value in the session.")
    async def set(self, ctx: ToolContext[FakeConfig, FakeState], args: SetArgs) -> Stored:
        ctx.state.values[args.key] = args.value
        return Stored(stored=args.key)

    @tool(description="Read a value from the session.", read_only=True)
    async def get(self, ctx: ToolContext[FakeConfig, FakeState], args: GetArgs) -> Value:
        return Value(value=ctx.state.values.get(args.key), label=ctx.state.label)

    @tool(description="Work for a while, recording concurrency.")
    async def work(self, ctx: ToolContext[FakeConfig, FakeState], args: WorkArgs) -> Worked:
        state = ctx.state
        state.running += 1
        state.max_running = max(state.max_running, state.running)
        state.order.append(args.seq)
        self.working += 1
        try:
            await anyio.sleep(args.seconds)
        finally:
            state.running -= 1
            self.working -= 1
        return Worked(seq=args.seq, session=ctx.session.session_id if ctx.session else None)

    @tool(description="Raise an unexpected exception.")
    async def boom(self, ctx: ToolContext[FakeConfig, FakeState]) -> Stored:
        raise ZeroDivisionError("divided by zero")

    @tool(description="Return a tiny image.")
    async def picture(self, ctx: ToolContext[FakeConfig, FakeState]) -> ToolResult[Size]:
        return ToolResult(Size(width=1, height=1), images=[Image(b"\x89PNG fake")])

    @tool(description="Return a huge text.", read_only=True)
    async def huge(self, ctx: ToolContext[FakeConfig, FakeState], args: WorkArgs) -> Text:
        return Text(text="\u0001" * (args.seq or 1))


class SharedFake(Backend[Any, None]):
    """A shared backend (warmup/shutdown only), like document search."""

    def __init__(self, name: str = "search", defaults: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(name, defaults=defaults, **kwargs)
        self.warmups = 0
        self.shutdowns = 0

    async def warmup(self) -> None:
        self.warmups += 1

    async def shutdown(self) -> None:
        self.shutdowns += 1

    @tool(description="Echo the query.", read_only=True)
    async def query(self, ctx: ToolContext[Any, None], args: GetArgs) -> Echo:
        return Echo(echo=args.key, warmups=self.warmups)


class LinkedFake(FakeBackend):
    """A session backend whose `label` names a live `fake` session to link to (as a browser names a vm)."""

    links = {"label": "fake"}  # noqa: RUF012 - a class-level table, as backends declare it
