"""Shaping a tool call: argument validation, invoking the handler, normalising its result."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from backends.base import Backend, Image, ToolContext, ToolResult, ToolSpec
from session.envelope import Envelope
from session.errors import BackendError, ParameterError, SandboxError
from session.validation import describe_validation_error

log = logging.getLogger(__name__)


@dataclass(slots=True)
class CallOutcome:
    """A finished tool call: the envelope, plus images to send beside it."""

    envelope: Envelope
    images: list[Image] = field(default_factory=list)


def validate_arguments(spec: ToolSpec, arguments: Mapping[str, Any] | None) -> BaseModel:
    """Raises: ParameterError (1002) naming each bad field, with the schema attached."""
    try:
        return spec.args_model.model_validate(dict(arguments or {}))
    except ValidationError as exc:
        raise ParameterError(
            describe_validation_error(exc, f"arguments of {spec.name}"),
            data={"input_schema": spec.input_schema()},
        ) from None


async def invoke(
    backend: Backend[Any, Any], spec: ToolSpec, ctx: ToolContext[Any], args: BaseModel
) -> tuple[dict[str, Any], list[Image]]:
    """Run a tool; an unexpected exception becomes a BackendError (2001) carrying its message."""
    try:
        result = await spec.invoke(backend, ctx, args)
    except SandboxError:
        raise
    except Exception as exc:
        log.exception("tool %s:%s raised", backend.name, spec.name)
        raise BackendError(f"{backend.name}:{spec.name} failed: {type(exc).__name__}: {exc}") from exc
    return normalise_result(result)


def normalise_result(result: Any) -> tuple[dict[str, Any], list[Image]]:
    images: list[Image] = []
    if isinstance(result, ToolResult):
        images = list(result.images)
        result = result.data
    if isinstance(result, BaseModel):
        return result.model_dump(mode="json"), images
    if result is None:
        return {}, images
    if isinstance(result, dict):
        return result, images
    return {"result": result}, images


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
