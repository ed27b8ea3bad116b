"""Shaping a tool call: the call record, argument validation, invoking, capping the result."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from backends.base import Backend, Image, ProgressFn, ToolContext, ToolResult, ToolSpec
from session.envelope import Envelope
from session.errors import BackendError, ParameterError, SandboxError
from session.models import Caller
from session.validation import describe_validation_error

log = logging.getLogger(__name__)

#: What one result may weigh on the wire (JSON text + structured content + base64 images):
#: the official MCP client refuses any streamable-HTTP event over 1 MiB.
RESULT_BUDGET = 900 * 1024
#: Room kept for the text rendering, the envelope's own fields and JSON-RPC framing.
_OVERHEAD = 16 * 1024


@dataclass(slots=True)
class ToolCall:
    """One tool call on its way to a handler."""

    caller: Caller
    spec: ToolSpec
    args: BaseModel
    meta: Any
    progress: ProgressFn | None = None
    handle: str | None = None

    def progress_kwargs(self) -> dict[str, Any]:
        return {"progress": self.progress} if self.progress is not None else {}


@dataclass(slots=True)
class CallOutcome:
    """A finished tool call: the envelope, plus images to send beside it."""

    envelope: Envelope
    images: list[Image] = field(default_factory=list)
    data_json: str | None = None
    """`envelope.data` as JSON text when it holds nothing but JSON types (set by `capped`,
    which renders it to weigh it anyway); the text block and structured content reuse it."""

    def text(self) -> str:
        """The text content block: the envelope's short rendering."""
        return self.envelope.text(data_json=self.data_json)

    def structured(self) -> dict[str, Any]:
        """The structured content: the whole envelope, JSON-ready."""
        return self.envelope.structured(plain_data=self.data_json is not None)

    @classmethod
    def capped(cls, envelope: Envelope, images: list[Image]) -> CallOutcome:
        """Keep the whole result under `RESULT_BUDGET`: the largest strings in `data` are cut
        (head and tail kept, with a note), and images that do not fit are dropped with a note."""
        budget = RESULT_BUDGET - _OVERHEAD
        kept: list[Image] = []
        for image in images:
            size = (len(image.data) + 2) // 3 * 4
            if size <= budget:
                kept.append(image)
                budget -= size
            else:
                envelope.data.setdefault("notes", []).append(
                    f"an image of {len(image.data)} bytes was dropped: it would exceed the 1 MiB result limit"
                )
        # The data travels twice (structured content and, capped at a few KB, the text).
        text, plain = _render(envelope.data)
        if not _fits(text, budget):
            _shrink(envelope.data, budget)
            text, plain = _render(envelope.data)
        return cls(envelope, kept, text if plain else None)


def _render(data: Any) -> tuple[str, bool]:
    """`data` as JSON text (what the text block shows), and whether it is plain JSON: no value
    needed converting (a datetime, a path) and no float is NaN or infinite."""
    converted = False

    def fallback(value: Any) -> str:
        nonlocal converted
        converted = True
        return str(value)

    try:
        text = json.dumps(data, ensure_ascii=False, default=fallback, allow_nan=False)
    except ValueError:
        return json.dumps(data, ensure_ascii=False, default=str), False
    return text, not converted


def _fits(text: str, budget: int) -> bool:
    """Whether `text` is at most `budget` bytes of UTF-8; not encoded when even 4 bytes a character would fit."""
    return len(text) * 4 <= budget or _weight(text) <= budget


def _weight(text: str) -> int:
    return len(text.encode())


def _shrink(data: dict[str, Any], budget: int) -> None:
    """Cut the largest string values until the data fits (never more than needed)."""
    while _weight(_render(data)[0]) > budget:
        path, value = _largest_string(data)
        if path is None or len(value) < 64:
            data.clear()
            data["notes"] = ["the result exceeded the 1 MiB limit and was dropped"]
            return
        excess = _weight(_render(data)[0]) - budget
        keep = max(len(value) - excess - 256, 0) // 2
        holder = path[0]
        holder[path[1]] = (
            f"{value[:keep]}\n... [{len(value) - 2 * keep} characters cut: the result is limited to 1 MiB] ...\n"
            f"{value[len(value) - keep:] if keep else ''}"
        )
        data["result_truncated"] = True


def _largest_string(data: Any) -> tuple[Any, str]:
    best: tuple[Any, str] = (None, "")
    stack: list[Any] = [data]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            if isinstance(value, str) and len(value) > len(best[1]):
                best = ((node, key), value)
            elif isinstance(value, dict | list):
                stack.append(value)
    return best


def validate_arguments(spec: ToolSpec, arguments: Mapping[str, Any] | None) -> BaseModel:
    """Raises: ParameterError (1002) naming each bad field, with the schema attached."""
    try:
        return spec.args_model.model_validate(dict(arguments or {}))
    except ValidationError as exc:
        raise ParameterError(
            describe_validation_error(exc, f"arguments of {spec.qualified_name}"),
            data={"input_schema": spec.input_schema()},
        ) from None


async def invoke(
    backend: Backend[Any, Any], spec: ToolSpec, ctx: ToolContext[Any, Any], args: BaseModel
) -> tuple[BaseModel, list[Image]]:
    """Run a backend tool; an unexpected exception becomes a BackendError (2001) carrying its message."""
    try:
        if spec.takes_args:
            result = await spec.handler(backend, ctx, args)
        else:
            result = await spec.handler(backend, ctx)
    except SandboxError:
        raise
    except Exception as exc:
        log.exception("tool %s raised", spec.qualified_name)
        raise BackendError(f"{spec.qualified_name} failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(result, ToolResult):
        return result.data, list(result.images)
    if isinstance(result, BaseModel):
        return result, []
    raise BackendError(f"{spec.qualified_name} returned {type(result).__name__}, not a result model")


def normalise_request(
    request: str | list[str] | Mapping[str, Mapping[str, Any] | None],
    config: Mapping[str, Any] | None = None,
) -> dict[str, Mapping[str, Any] | None]:
    """`"vm"`, `["vm", "bash"]` or `{"vm": {...}, "bash": None}` -> resource -> config.

    Raises: ParameterError (1002) for any other shape.
    """
    if isinstance(request, str):
        return {request: config}
    if config:
        raise ParameterError("config applies to a single resource; pass a mapping resource -> config instead")
    if isinstance(request, Mapping):
        return dict(request)
    if isinstance(request, list) and request and all(isinstance(r, str) for r in request):
        return dict.fromkeys(request)
    raise ParameterError(
        "resource must be a name ('bash'), a list of names (['bash', 'vm']) or a mapping name -> config"
    )
