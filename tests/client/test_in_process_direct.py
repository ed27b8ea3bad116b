"""`Sandbox()` in the default mode calls the in-process engine directly; an explicit mode keeps
the SDK's in-memory MCP client. Both must hand the caller the same envelopes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sandbox import Sandbox
from tests.support.manifests import write_manifest

#: What differs between two runs of the same call: timings, ids, expiry instants, pids and paths.
_VOLATILE = {
    "execution_time_ms",
    "duration_ms",
    "details",
    "session_id",
    "expires_at",
    "created_at",
    "last_used_at",
    "session_name",
}


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


async def _script(sandbox: Sandbox) -> list[dict[str, Any]]:
    """Successes, tool errors and engine errors, as a user's program would meet them."""
    results = [
        await sandbox.execute("bash:run", {"command": "echo temporary"}),
        await sandbox.execute("create_session", {"resource": "bash"}),
        await sandbox.execute("bash:run", {"command": "cd /tmp; echo hi; echo oops >&2; false"}),
        await sandbox.execute("bash:run", {"command": "pwd"}),
        await sandbox.execute("bash:run", {"command": 123}),
        await sandbox.execute("bash:run", {"command": "true", "session_id": "resource-no-such-handle"}),
        await sandbox.execute("nosuch:tool", {}),
        await sandbox.execute("list_sessions", {}),
        await sandbox.execute("destroy_session", {}),
    ]
    return [_stable(r) for r in results]


async def test_default_in_process_sandbox_calls_the_engine_directly(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    async with Sandbox(manifest=manifest) as direct:
        assert direct._engine is not None
        assert direct._client is None
        result = await direct.execute("bash:run", {"command": "echo hi"})
        assert result["code"] == 0
        assert result["data"]["stdout"] == "hi\n"
    async with Sandbox(manifest=manifest, mode="2026-07-28") as over_mcp:
        assert over_mcp._engine is None
        assert over_mcp._client is not None


async def test_direct_and_mcp_in_memory_give_the_same_envelopes(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    async with Sandbox(manifest=manifest) as direct:
        direct_results = await _script(direct)
        direct_tools = await direct.get_tools()
    async with Sandbox(manifest=manifest, mode="2026-07-28") as over_mcp:
        mcp_results = await _script(over_mcp)
        mcp_tools = await over_mcp.get_tools()
    assert direct_results == mcp_results
    codes = [r["code"] for r in direct_results]
    assert codes[:4] == [0, 0, 0, 0]
    assert codes[-2:] == [0, 0]
    assert all(code > 1000 for code in codes[4:7])
    assert direct_tools == mcp_tools


async def test_a_malformed_worker_id_is_the_same_clear_error_on_both(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    answers = []
    for mode in ("auto", "2026-07-28"):
        async with Sandbox(manifest=manifest, worker_id="short", mode=mode) as sandbox:
            answers.append(await sandbox.execute("list_sessions", {}))
    assert answers[0]["code"] == answers[1]["code"] == 1002
    assert answers[0]["message"] == answers[1]["message"]
    assert "agentflow/worker_id" in answers[0]["message"]


async def test_progress_reaches_the_callback_on_the_direct_path(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    seen: list[float] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        seen.append(done)

    async with Sandbox(manifest=manifest) as sandbox:
        await sandbox.create_session("bash", {"progress_interval": 0.2})
        result = await sandbox.execute(
            "bash:run", {"command": "for i in 1 2 3; do echo $i; sleep 0.4; done"}, progress=progress
        )
    assert result["code"] == 0
    assert seen, "a command running over a second reports progress"
