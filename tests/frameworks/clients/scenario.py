"""The scenario every framework probe runs, in the framework's own virtualenv (stdlib only here).

A probe adapts its framework to two coroutines, `list_tools() -> [names]` and
`call(name, arguments) -> Outcome`, where an Outcome is what the framework hands the model:
its text, the kinds of content blocks (text, image), whether it was flagged as an error,
and the structured content when the framework exposes it. `run` drives the scenario and
the probe prints the JSON on stdout for the pytest side (tests/frameworks) to assert on.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

Outcome = dict[str, Any]
Call = Callable[[str, dict[str, Any]], Awaitable[Outcome]]

SESSION_ID = re.compile(r'"session_id":\s*"([^"]+)"')


def token_headers() -> dict[str, str]:
    """`Authorization: Bearer` from AGENTFLOW_SANDBOX_TOKEN, when the server was given one."""
    token = os.environ.get("AGENTFLOW_SANDBOX_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def outcome(text: str, blocks: list[str], is_error: bool | None, structured: Any = None) -> Outcome:
    return {"text": text, "blocks": blocks, "is_error": is_error, "structured": structured}


def session_handle(created: Outcome) -> str | None:
    """The handle a model would pass back: data.session_id, read from what the framework gave it."""
    structured = created.get("structured")
    if isinstance(structured, dict) and isinstance(structured.get("data"), dict):
        value = structured["data"].get("session_id")
        if isinstance(value, str):
            return value
    match = SESSION_ID.search(created.get("text") or "")
    return match.group(1) if match else None


async def guarded(call: Call, name: str, arguments: dict[str, Any]) -> Outcome:
    """A call whose exception is reported as data (a framework raising is itself a finding)."""
    try:
        return await call(name, arguments)
    except Exception as exc:
        return {"exception": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}


async def run(list_tools: Callable[[], Awaitable[list[str]]], call: Call) -> dict[str, Any]:
    result: dict[str, Any] = {"tools": sorted(await list_tools())}
    result["temporary"] = await guarded(call, "bash_run", {"command": "pwd"})
    result["screenshot"] = await guarded(call, "vm_screenshot", {})
    result["bad_argument"] = await guarded(call, "bash_run", {"command": "true", "timeout": -1})
    # The session comes last: the caller checks its processes right after the probe exits, well within the TTL or grace.
    result["create"] = await guarded(call, "create_session", {"resource": "bash"})
    handle = session_handle(result["create"])
    result["session_id"] = handle
    if handle is not None:
        result["cd"] = await guarded(call, "bash_run", {"command": "cd /tmp", "session_id": handle})
        result["pwd"] = await guarded(
            call, "bash_run", {"command": 'pwd; echo "$AGENTFLOW_SESSION"', "session_id": handle}
        )
    return result


def emit(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
