"""The result envelope every tool call returns, and the one place errors become codes."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field, field_serializer

from session.errors import ERROR_NAMES, SandboxError

log = logging.getLogger(__name__)


def utc_iso(moment: datetime) -> str:
    """`2026-11-25T14:05:00.123Z`: the form agents and humans both read."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ResultMeta(BaseModel):
    """Facts about the call: which tool, which session, how long, and when the session expires."""

    tool: str
    resource_type: str | None = None
    session_id: str | None = None
    temporary_session: bool = False
    execution_time_ms: float = 0.0
    expires_at: datetime | None = Field(
        default=None, description="When the explicit session is reaped if left idle (UTC)."
    )

    @field_serializer("expires_at")
    def _iso(self, value: datetime | None) -> str | None:
        return utc_iso(value) if value is not None else None

    def plain(self) -> dict[str, Any]:
        """`model_dump(mode="json")`, written out: it runs once per call."""
        return {
            "tool": self.tool,
            "resource_type": self.resource_type,
            "session_id": self.session_id,
            "temporary_session": self.temporary_session,
            "execution_time_ms": self.execution_time_ms,
            "expires_at": utc_iso(self.expires_at) if self.expires_at is not None else None,
        }


class Envelope(BaseModel):
    """`{"code", "message", "data", "meta"}`; `code != 0` is an error (see `session.errors`)."""

    code: int = 0
    message: str = "success"
    data: dict[str, Any] = Field(default_factory=dict)
    meta: ResultMeta

    @property
    def ok(self) -> bool:
        return self.code == 0

    def structured(self, *, plain_data: bool = False) -> dict[str, Any]:
        """The envelope as JSON-ready data, equal to `model_dump(mode="json")`.

        With `plain_data` (the caller knows `data` holds only JSON types, e.g. a result model
        dumped in JSON mode) it is assembled directly instead of by a serializer pass.
        """
        if not plain_data:
            return self.model_dump(mode="json")
        return {"code": self.code, "message": self.message, "data": self.data, "meta": self.meta.plain()}

    def text(self, limit: int = 4000, *, data_json: str | None = None) -> str:
        """A short human/LLM-readable rendering for the MCP text content block.

        `data_json`: `data` already rendered as JSON (the result cap renders it to weigh it).
        """
        head = f"[{self.meta.tool}] " if self.meta.tool else ""
        if not self.ok:
            head += f"error {self.code} ({ERROR_NAMES.get(self.code, 'error')}): {self.message}"
        else:
            head += "ok"
        if self.meta.temporary_session:
            head += (
                " (ran in a temporary session, destroyed after this call: nothing it changed persists. "
                "To keep state, call create_session and pass its session_id to every call)"
            )
        elif self.meta.session_id:
            head += f" (session_id {self.meta.session_id}"
            if self.meta.expires_at is not None:
                head += f", expires {utc_iso(self.meta.expires_at)}"
            head += ")"
        if self.data:
            body = data_json if data_json is not None else json.dumps(self.data, ensure_ascii=False, default=str)
            if len(body) > limit:
                body = body[:limit] + f"... [{len(body) - limit} more characters in structuredContent]"
            head += "\n" + body
        return head


#: Longest error message a result carries (messages echo at most bounded prefixes of
#: input; this is the backstop).
MESSAGE_LIMIT = 2000


def success(data: BaseModel | dict[str, Any], meta: ResultMeta, message: str = "success") -> Envelope:
    payload = data.model_dump(mode="json") if isinstance(data, BaseModel) else data
    return Envelope(code=0, message=message, data=payload, meta=meta)


def _bounded(message: str) -> str:
    if len(message) <= MESSAGE_LIMIT:
        return message
    return f"{message[:MESSAGE_LIMIT]}... ({len(message) - MESSAGE_LIMIT} more characters)"


def failure(exc: BaseException, meta: ResultMeta) -> Envelope:
    """Turn any exception into an error envelope; never a traceback in the result.

    Sandbox errors keep their code and message. Anything else is a bug or a backend
    surprise: it is logged with its traceback here and reported as 2001 (raised inside
    a backend tool) by the caller wrapping it in `BackendError` first, or 5000.
    """
    if isinstance(exc, SandboxError):
        return Envelope(code=exc.code, message=_bounded(exc.message), data=exc.data, meta=meta)
    log.error("internal error in %s", meta.tool, exc_info=exc)
    return Envelope(code=5000, message=_bounded(f"internal error: {type(exc).__name__}: {exc}"), meta=meta)
