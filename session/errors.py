"""The one exception hierarchy, each class carrying the spec's numeric code.

Backends and the engine raise these; `session.envelope.failure` is the single place
that turns them into result envelopes. Subclasses also inherit the matching builtin
(`ExecutionTimeout` is a `TimeoutError`) so ordinary `except` clauses keep working.
"""

from __future__ import annotations

from typing import Any, ClassVar


class SandboxError(Exception):
    """Root of every error the sandbox reports to a caller.

    `data` is carried into the envelope's `data` (e.g. partial output of a command
    that timed out), so a failure can still hand back what was produced.
    """

    code: ClassVar[int] = 5000
    title: ClassVar[str] = "internal error"

    def __init__(self, message: str, *, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data: dict[str, Any] = data or {}


class ToolNotFound(SandboxError, LookupError):
    code = 1001
    title = "tool not found"


class ParameterError(SandboxError, ValueError):
    code = 1002
    title = "parameter error"


class SessionError(SandboxError):
    code = 1003
    title = "session error"


class WorkerNotFound(SandboxError, LookupError):
    code = 1004
    title = "worker not found"


class ResourceTypeNotFound(SandboxError, LookupError):
    code = 1005
    title = "resource type not found"


class PermissionDenied(SandboxError, PermissionError):
    code = 1006
    title = "insufficient permissions"


class BackendError(SandboxError):
    code = 2001
    title = "backend error"


class ExecutionTimeout(SandboxError, TimeoutError):
    code = 2002
    title = "execution timeout"


class BackendNotWarmedUp(SandboxError):
    code = 2003
    title = "backend not warmed up"


class ResourceUnavailable(SandboxError):
    code = 2004
    title = "resource unavailable"


class InternalError(SandboxError):
    code = 5000
    title = "internal error"


class ConfigurationError(SandboxError):
    code = 5001
    title = "configuration error"


class ServiceUnavailable(SandboxError):
    code = 5002
    title = "service unavailable"


def _codes() -> dict[int, str]:
    names = {0: "success"}
    stack: list[type[SandboxError]] = [SandboxError]
    while stack:
        cls = stack.pop()
        names.setdefault(cls.code, cls.title)
        stack.extend(cls.__subclasses__())
    return dict(sorted(names.items()))


#: code -> what it means, derived from the classes above (the one source of the table).
ERROR_NAMES: dict[int, str] = _codes()
#: code -> the exception class a client raises for it.
ERROR_CLASSES: dict[int, type[SandboxError]] = {cls.code: cls for cls in SandboxError.__subclasses__()}

#: How much of any caller-supplied value an error message may echo.
ECHO_LIMIT = 200


def shown(value: object, limit: int = ECHO_LIMIT) -> str:
    """`repr(value)` cut to a bounded prefix: messages never echo a huge argument back."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"
