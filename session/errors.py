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

    def __init__(self, message: str, *, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data: dict[str, Any] = data or {}


class ToolNotFound(SandboxError, LookupError):
    code = 1001


class ParameterError(SandboxError, ValueError):
    code = 1002


class SessionError(SandboxError):
    code = 1003


class WorkerNotFound(SandboxError, LookupError):
    code = 1004


class ResourceTypeNotFound(SandboxError, LookupError):
    code = 1005


class PermissionDenied(SandboxError, PermissionError):
    code = 1006


class BackendError(SandboxError):
    code = 2001


class ExecutionTimeout(SandboxError, TimeoutError):
    code = 2002


class BackendNotWarmedUp(SandboxError):
    code = 2003


class ResourceUnavailable(SandboxError):
    code = 2004


class InternalError(SandboxError):
    code = 5000


class ConfigurationError(SandboxError):
    code = 5001


class ServiceUnavailable(SandboxError):
    code = 5002


ERROR_NAMES: dict[int, str] = {
    0: "success",
    1001: "tool not found",
    1002: "parameter error",
    1003: "session error",
    1004: "worker not found",
    1005: "resource type not found",
    1006: "insufficient permissions",
    2001: "backend error",
    2002: "execution timeout",
    2003: "backend not warmed up",
    2004: "resource unavailable",
    5000: "internal error",
    5001: "configuration error",
    5002: "service unavailable",
}
