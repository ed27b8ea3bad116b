"""The seed document's snippets, run as written (with `bash` for `vm` where the seed uses `vm`).

Most run twice: on the in-process server (`Sandbox()`) and over HTTP (`Sandbox(url)`, the
light 2026-07-28 path). The `vm` versions live in tests/backends/test_vm_seed.py.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from sandbox import Sandbox, SandboxError
from tests.support import procs
from tests.support.leaks import session_pids, wait_gone
from tests.support.polling import eventually
from tests.support.servers import ServerProcess, running_http_server


@pytest.fixture(scope="module")
def snippet_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_http_server(tmp_path_factory.mktemp("snippets")) as server:
        yield server


@pytest.fixture(params=["in-process", "http"])
def connect(request: pytest.FixtureRequest) -> Callable[[], Sandbox]:
    """Makes the snippet's `Sandbox()`: the in-process server, or the shared HTTP one over the light path."""
    if request.param == "in-process":
        return Sandbox
    server: ServerProcess = request.getfixturevalue("snippet_server")
    return lambda: Sandbox(url=server.mcp_url, token=server.token)


async def test_explicit_mode_reuses_one_session(connect: Callable[[], Sandbox]) -> None:
    async with connect() as sandbox:
        await sandbox.create_session("bash", {"cwd": "/tmp", "custom_name": "my_bash"})
        first = await sandbox.execute("bash:run", {"command": "cd /; export SEEN=1"})
        second = await sandbox.execute("bash:run", {"command": "pwd; echo $SEEN"})
        third = await sandbox.execute("bash:run", {"command": "echo hello"})
        assert second["data"]["stdout"] == "/\n1\n"  # state carried over
        ids = {r["meta"]["session_id"] for r in (first, second, third)}
        assert len(ids) == 1
        assert not any(r["meta"]["temporary_session"] for r in (first, second, third))
        listed = await sandbox.list_sessions()
        assert listed["sessions"][0]["session_name"] == "my_bash"
        await sandbox.destroy_session("bash")
        assert (await sandbox.list_sessions()) == {"sessions": []}


async def test_temporary_mode_gets_a_fresh_session_each_call(connect: Callable[[], Sandbox]) -> None:
    async with connect() as sandbox:
        first = await sandbox.execute("bash:run", {"command": "cd /; export SEEN=1; pwd"})
        second = await sandbox.execute("bash:run", {"command": "echo ${SEEN:-unset}"})
        assert first["meta"]["temporary_session"] is True
        assert second["meta"]["temporary_session"] is True
        assert first["meta"]["session_id"] != second["meta"]["session_id"]
        assert second["data"]["stdout"] == "unset\n"  # state did not carry over
        assert (await sandbox.list_sessions())["sessions"] == []
        # destroyed before the result returned: what is left are the warm pool's spare shells

        async def refilled() -> bool:
            pool = (await sandbox.get_status())["warm_pools"]["bash"]
            return bool(pool["ready"] == pool["target"])

        spares: set[int] = set()  # the HTTP variant's test manifest keeps no warm pool: nothing is left
        if "warm_pools" in await sandbox.get_status():
            await eventually(refilled)
            pool = (await sandbox.get_status())["warm_pools"]["bash"]
            spares = {pid for label in pool["members"] for pid in session_pids(tag=label)}
        # The kill happened before the result; the kernel may take a moment to finish the exits.
        await eventually(lambda: set(session_pids(tag_prefix="bash-")) <= spares)


async def test_result_envelope_has_the_seeds_fields(connect: Callable[[], Sandbox]) -> None:
    async with connect() as sandbox:
        await sandbox.create_session("bash")
        result = await sandbox.execute("bash:run", {"command": "echo hi"})
        assert result["code"] == 0
        assert result["message"] == "success"
        assert result["data"]["stdout"] == "hi\n"
        meta = result["meta"]
        assert meta["tool"] == "run"
        assert meta["resource_type"] == "bash"
        assert meta["session_id"].startswith("bash-")
        assert meta["temporary_session"] is False
        assert meta["execution_time_ms"] > 0
        assert meta["expires_at"].endswith("Z")


async def test_refresh_one_and_all_sessions(connect: Callable[[], Sandbox]) -> None:
    async with connect() as sandbox:
        await sandbox.create_session("bash")
        one = await sandbox.refresh_sessions("bash")
        every = await sandbox.refresh_sessions()
        assert one["refreshed"][0]["resource_type"] == "bash"
        assert len(every["refreshed"]) == 1


async def test_reinitialize_returns_old_and_new_ids_and_applies_config(connect: Callable[[], Sandbox]) -> None:
    async with connect() as sandbox:
        await sandbox.create_session("bash", {"cwd": "/tmp"})
        result = await sandbox.reinitialize("bash", {"cwd": "/"})
        assert result["status"] == "success"
        assert result["old_session_id"] != result["new_session_id"]
        assert result["config_applied"] == {"cwd": "/"}
        pwd = await sandbox.execute("bash:run", {"command": "pwd"})
        assert pwd["data"]["stdout"] == "/\n"
        assert pwd["meta"]["session_id"] == result["new_session_id"]


async def test_list_sessions_after_creating_several(connect: Callable[[], Sandbox]) -> None:
    async with connect() as sandbox:
        await sandbox.create_session(["bash"])
        sessions = (await sandbox.list_sessions())["sessions"]
        assert [(s["resource_type"], s["status"]) for s in sessions] == [("bash", "active")]
        assert {"session_id", "session_name", "created_at", "expires_at", "config"} <= set(sessions[0])
        details = sessions[0]["details"]  # what the session holds, for leak accounting
        assert details["shell_pid"] in details["pids"]
        assert set(details["pids"]) <= set(session_pids(tag_prefix="bash-"))


async def test_best_practice_try_finally_destroys(connect: Callable[[], Sandbox]) -> None:
    async with connect() as sandbox:
        try:
            await sandbox.create_session("bash")
            await sandbox.execute("bash:run", {"command": "sleep 0.01"})
        finally:
            await sandbox.destroy_session("bash")
        assert (await sandbox.list_sessions())["sessions"] == []


async def test_leaving_the_context_manager_cleans_up():
    async with Sandbox() as sandbox:
        await sandbox.create_session("bash")
        await sandbox.execute("bash:run", {"command": "sleep 300 &"})
        assert session_pids(tag_prefix="bash-")
    await wait_gone(tag_prefix="bash-")


async def test_session_methods_raise_typed_errors_with_codes(connect: Callable[[], Sandbox]) -> None:
    async with connect() as sandbox:
        with pytest.raises(SandboxError) as caught:
            await sandbox.destroy_session("bash")
        assert caught.value.code == 1003
        with pytest.raises(SandboxError) as caught:
            await sandbox.create_session("nonexistent")
        assert caught.value.code == 1005
        with pytest.raises(SandboxError) as caught:
            await sandbox.create_session("bash", {"cwd": 5})
        assert caught.value.code == 1002
        assert "cwd" in caught.value.message


async def test_bad_tool_calls_come_back_as_error_envelopes_and_the_server_stays_healthy(
    connect: Callable[[], Sandbox],
) -> None:
    async with connect() as sandbox:
        cases: list[tuple[str, dict[str, Any], int]] = [
            ("bash:nope", {}, 1001),
            ("nowhere:run", {}, 1001),  # an unknown tool, whatever its prefix (1005 is for create_session)
            ("bash:run", {}, 1002),
            ("bash:run", {"command": 42}, 1002),
            ("bash:run", {"command": "echo", "extra": 1}, 1002),
            ("bash:run", {"command": "sleep 5", "timeout": 0.2}, 2002),
        ]
        for tool, params, code in cases:
            result = await sandbox.execute(tool, params)
            assert result["code"] == code, (tool, params, result)
            assert result["message"]
            assert "Traceback" not in str(result)
        assert (await sandbox.execute("bash:run", {"command": "echo ok"}))["data"]["stdout"] == "ok\n"


async def test_get_tools_and_status(connect: Callable[[], Sandbox]) -> None:
    async with connect() as sandbox:
        tools = {t["name"]: t for t in await sandbox.get_tools()}
        assert "bash:run" in tools
        assert tools["bash:run"]["mcp_name"] == "bash_run"
        assert "command" in tools["bash:run"]["input_schema"]["properties"]
        assert {"create_session", "destroy_session", "list_sessions", "refresh_sessions", "reinitialize"} <= set(tools)
        status = await sandbox.get_status()
        assert status["backends"]["bash"]["kind"] == "session"
        assert (await sandbox.warmup())["backends"]["bash"].startswith("nothing to warm")


async def test_two_sandboxes_are_two_isolated_workers():
    async with Sandbox() as a:
        await a.create_session("bash")
        await a.execute("bash:run", {"command": "export MINE=a"})
        # a second Sandbox() is a separate in-process server; a second worker on the same
        # server is covered over real transports in tests/interaction
        async with Sandbox() as b:
            assert (await b.list_sessions())["sessions"] == []


def _sandbox_over(over: str, manifest: Path, request: pytest.FixtureRequest) -> Sandbox:
    if over == "in-memory":
        return Sandbox(manifest=manifest)
    if over == "stdio":
        return Sandbox(command=[sys.executable, "-m", "mcp_server", "serve"], manifest=manifest)
    server: ServerProcess = request.getfixturevalue("snippet_server")
    return Sandbox(url=server.mcp_url, token=server.token)


@pytest.mark.parametrize("over", ["in-memory", "stdio", "http"])
async def test_a_cancelled_call_stops_its_command_on_the_server(over, bash_manifest, tmp_path, request):
    marker = tmp_path / "finished"
    sandbox = _sandbox_over(over, bash_manifest, request)
    async with sandbox:
        await sandbox.create_session("bash")
        with anyio.move_on_after(1.0):
            await sandbox.execute("bash:run", {"command": f"sleep 3; touch {marker}"})
        await eventually(lambda: not _sleepers(), 10)  # the sleep was interrupted, not left running
        after = await sandbox.execute("bash:run", {"command": "echo still-usable"})
        assert after["data"]["stdout"] == "still-usable\n"
        # The shell runs one command line at a time: having answered the next one, it has
        # abandoned the interrupted `sleep 3; touch` list, so the touch can never run.
        assert not marker.exists()
        assert not _sleepers()


def _sleepers() -> list[int]:
    return [pid for pid in session_pids(tag_prefix="bash-") if procs.command_line(pid).startswith("sleep 3")]



@pytest.mark.parametrize("over", ["in-memory", "stdio", "http"])
async def test_long_commands_report_progress_to_callers_that_ask(
    over: str, bash_manifest: Path, request: pytest.FixtureRequest
) -> None:
    reports: list[tuple[float, str | None]] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        reports.append((done, message))

    sandbox = _sandbox_over(over, bash_manifest, request)
    async with sandbox:
        await sandbox.create_session("bash", {"progress_interval": 0.3})
        result = await sandbox.execute("bash:run", {"command": "sleep 1.5; echo done"}, progress=progress)
        assert result["data"]["stdout"] == "done\n"
    assert len(reports) >= 2
    assert all(message and "running for" in message for _, message in reports)
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)


async def test_many_sandboxes_open_and_close_in_any_order_from_one_task(bash_manifest):
    sandboxes = [Sandbox(manifest=bash_manifest) for _ in range(3)]
    for sandbox in sandboxes:
        await sandbox.start()
        await sandbox.create_session("bash")
    for sandbox in sandboxes:  # not reversed: each connection is owned by a task of its own
        assert (await sandbox.execute("bash:run", {"command": "echo hi"}))["data"]["stdout"] == "hi\n"
        await sandbox.close()
    await wait_gone(tag_prefix="bash-")


async def test_a_sandbox_that_cannot_connect_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(SandboxError) as caught:
        await Sandbox(manifest=tmp_path / "missing.toml").start()
    assert caught.value.code == 5001
