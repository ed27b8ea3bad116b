"""Agent frameworks as MCP clients, used the way their docs show, over streamable HTTP.

- fastmcp `Client(url)`, default mode: negotiates 2026-07-28 (no MCP session at all);
- openai-agents `MCPServerStreamableHttp` (2026-07-28 with mcp 2), through the FunctionTools an
  Agent gets, strict schema conversion on;
- langchain-mcp-adapters `MultiServerMCPClient.get_tools()` (mcp<2): a new MCP connection per call
  (over stdio a new server process per call: there a handle gets a 1003 that says why).

For each, one probe run (tests/frameworks/clients) against a fresh server gives the results
these tests check: the tools are listed; a call without a session runs in a temporary one and
says so; `create_session` returns a handle (`data.session_id`, also in the text) and state
carries across calls that pass it back; a screenshot arrives as an image block; a bad argument
is a tool error, not an exception; and after the client is gone, the grace and the TTL, no
process of the run is left.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.frameworks.helpers import (
    DISCONNECT_GRACE,
    GONE_TIMEOUT,
    SESSION_TTL,
    SandboxServer,
    framework_manifest,
    run_probe,
    sandbox_server,
)
from tests.support import leaks
from tests.support.polling import eventually, eventually_sync
from tests.support.servers import server_command

pytestmark = pytest.mark.slow

META_TOOLS = {"create_session", "destroy_session", "list_sessions", "refresh_sessions", "reinitialize"}
FRAMEWORKS = {
    "fastmcp": ("fastmcp", "fastmcp_probe.py"),
    "openai-agents": ("openai-agents", "openai_agents_probe.py"),
    "langchain-mcp-adapters": ("langchain", "langchain_probe.py"),
}
README = Path(__file__).resolve().parents[2] / "README.md"
# 128 bits in base64url is 22 characters; hex would be 32.
MIN_HANDLE_LENGTH = 22


class Run:
    def __init__(self, framework: str, server: SandboxServer, result: dict[str, Any]) -> None:
        self.framework = framework
        self.server = server
        self.result = result
        # Taken right after the probe exits: the session outlives it by the grace or the TTL,
        # so the leak check below is about processes that really existed.
        self.session_tag = _session_tag(result)
        self.alive_after_close = server.session_pids(self.session_tag) if self.session_tag else []

    def outcome(self, step: str) -> dict[str, Any]:
        value = self.result.get(step)
        created = str((self.result.get("create") or {}).get("text", ""))[:400]
        assert value is not None, f"{self.framework}: the probe did not reach {step!r}; create_session said: {created}"
        assert "exception" not in value, f"{self.framework}: {step} raised {value['exception']}\n{value['traceback']}"
        return value


@pytest.fixture(scope="module", params=sorted(FRAMEWORKS))
def run(
    request: pytest.FixtureRequest, framework_venvs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Run]:
    """The probe's results for one framework, against a server of its own (kept for the leak check)."""
    framework = request.param
    venv, script = FRAMEWORKS[framework]
    with sandbox_server(tmp_path_factory.mktemp(venv)) as server:
        result = run_probe(framework_venvs[venv], script, server.url, server.token)
        yield Run(framework, server, result)


def test_tools_are_listed(run: Run) -> None:
    tools = set(run.result["tools"])
    assert {"bash_run", "vm_screenshot", *META_TOOLS} <= tools


def test_a_call_without_session_runs_in_a_temporary_one_and_says_so(run: Run) -> None:
    temporary = run.outcome("temporary")
    assert _succeeded(temporary), temporary
    assert "temporary" in temporary["text"], temporary["text"]
    assert "/tmp\n" not in temporary["text"]  # the state test's `cd /tmp` is then a real change


def test_create_session_returns_a_handle_in_data_and_text(run: Run) -> None:
    created = run.outcome("create")
    assert _succeeded(created), created["text"]
    handle = run.result["session_id"]
    assert isinstance(handle, str), f"no session_id in {created['text']!r}"
    assert len(handle) >= MIN_HANDLE_LENGTH, f"handle {handle!r} is too short to be unguessable"
    assert handle in created["text"], "the model must see the handle in the text content"


def test_state_carries_across_calls_through_the_handle(run: Run) -> None:
    cd, pwd = run.outcome("cd"), run.outcome("pwd")
    assert _succeeded(cd), cd["text"]
    assert _succeeded(pwd), pwd["text"]
    assert "temporary session" not in pwd["text"], pwd["text"]
    stdout = _stdout(pwd)
    assert stdout.splitlines()[0] == "/tmp", stdout


def test_a_screenshot_arrives_as_an_image_block(run: Run) -> None:
    shot = run.outcome("screenshot")
    assert _succeeded(shot), shot["text"]
    assert "image" in shot["blocks"], shot["blocks"]


def test_a_bad_argument_is_a_tool_error_not_an_exception(run: Run) -> None:
    bad = run.outcome("bad_argument")
    assert "error 1002" in bad["text"], bad["text"]
    assert "timeout" in bad["text"]
    # openai-agents hands the model text only; its MCP-level result carries the flag.
    flagged = bad["is_error"] if bad["is_error"] is not None else run.result["bad_argument_raw"]["is_error"]
    assert flagged is True


async def test_nothing_is_left_after_close_grace_and_ttl(run: Run) -> None:
    """The probe has exited; its sessions end by the disconnect grace or, with no connection, the TTL."""
    within = SESSION_TTL + DISCONNECT_GRACE + GONE_TIMEOUT
    assert run.session_tag is not None, "no session was created, so there is nothing to see go"
    assert run.alive_after_close, f"{run.framework}: the session's shell was already gone when the probe exited"
    await eventually(
        lambda: not run.server.session_pids(),
        within,
        what=lambda: f"{run.framework}: the server's bash processes to exit: {run.server.session_pids()}",
    )
    await eventually(
        lambda: not run.server.descendants(),
        within,
        what=lambda: f"{run.framework}: the server's children to exit: {run.server.descendants()}",
    )


def test_langchain_stdio_handles_of_an_earlier_process_get_a_1003_that_says_why(
    framework_venvs: dict[str, Path], tmp_path: Path
) -> None:
    """`get_tools()` over stdio starts a server per call: the handle's session died with its process."""
    marker = leaks.new_test_marker()
    manifest = framework_manifest(tmp_path, marker, resources=("bash",))
    argv = [*server_command(), "serve", "--transport", "stdio", "--manifest", str(manifest)]
    try:
        result = run_probe(framework_venvs["langchain"], "langchain_stdio_probe.py", json.dumps(argv), "")
        assert _succeeded(result["create"]), result["create"]["text"]
        assert result["session_id"], result["create"]["text"]
        refused = result["by_handle"]
        assert refused["is_error"] is True, refused["text"]
        assert "error 1003" in refused["text"]
        assert "earlier server process" in refused["text"]
        assert "Use it from your agent framework" in refused["text"]
        readme = README.read_text()
        assert "## Use it from your agent framework" in readme
        assert "client.session(" in readme
        # Each call's server has exited with its stdin; none may leave a shell behind.
        eventually_sync(
            lambda: not leaks.session_pids(test_marker=marker),
            GONE_TIMEOUT,
            what=lambda: f"the stdio servers' shells to exit: {leaks.session_pids(test_marker=marker)}",
        )
    finally:
        leaks.kill_leftovers(test_marker=marker)


def _succeeded(outcome: dict[str, Any]) -> bool:
    """Not flagged as an error; openai-agents has no flag, so there the envelope's text decides."""
    if outcome["is_error"] is not None:
        return outcome["is_error"] is False
    return re.match(r"\[\w+\] error \d+", outcome["text"]) is None


def _stdout(outcome: dict[str, Any]) -> str:
    structured = outcome.get("structured")
    if isinstance(structured, dict):
        return str(structured["data"]["stdout"])
    match = re.search(r'"stdout":\s*"((?:[^"\\]|\\.)*)"', outcome["text"])
    assert match, outcome["text"]
    return match.group(1).encode().decode("unicode_escape")


def _session_tag(result: dict[str, Any]) -> str | None:
    """The AGENTFLOW_SESSION tag the state test's session printed, when it got that far."""
    pwd = result.get("pwd")
    if not isinstance(pwd, dict) or "exception" in pwd or not _succeeded(pwd):
        return None
    lines = _stdout(pwd).splitlines()
    return lines[1].strip() if len(lines) > 1 and lines[1].startswith("bash-") else None
