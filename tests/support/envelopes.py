"""Reading the server's result envelopes, and the probe command the transport tests run."""

from __future__ import annotations

from typing import Any, cast

from mcp_types import RequestParamsMeta

WORKER_META_KEY = "agentflow/worker_id"  # documented `_meta` key (mcp_server/worker_identity.py)

# A command that reports the session marker and the shell's pid and starts a long background
# child, so the process-table checks also cover a session's descendants.
PROBE = 'sleep 300 & echo "$AGENTFLOW_SESSION $$ $PPID"'


def worker_meta(key: str) -> RequestParamsMeta:
    """A request `_meta` naming the worker `key`."""
    return cast(RequestParamsMeta, {WORKER_META_KEY: key})


def envelope(result: Any) -> dict[str, Any]:
    """The structured envelope of a `CallToolResult`, checked against its text and is_error."""
    env = result.structured_content
    assert isinstance(env, dict), f"no structured_content in {result!r}"
    assert set(env) >= {"code", "message", "data", "meta"}, env
    assert result.content
    assert result.content[0].type == "text"
    assert result.content[0].text
    assert bool(result.is_error) == (env["code"] != 0), (result.is_error, env)
    return env


def ok(result: Any) -> dict[str, Any]:
    env = envelope(result)
    assert env["code"] == 0, env
    data: dict[str, Any] = env["data"]
    return data


def parse_probe(data: dict[str, Any]) -> tuple[str, int, int]:
    """(session tag, shell pid, its parent's pid) from PROBE's output."""
    tag, shell_pid, parent_pid = data["stdout"].split()
    assert tag.startswith("bash-"), tag
    return tag, int(shell_pid), int(parent_pid)
