"""The bash backend against a real bash: persistence, timeouts, caps, cleanup."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import anyio
import pytest

from backends.base import ToolContext
from backends.bash import BashBackend, RunArgs
from backends.bash.backend import BashConfig, BashState
from backends.processes import sweep_orphan_dirs
from session.errors import ExecutionTimeout, ParameterError
from tests.support import leaks, procs
from tests.support.leaks import session_pids
from tests.support.polling import eventually


@asynccontextmanager
async def shell(**config: object) -> AsyncIterator[tuple[BashBackend, ToolContext[BashState]]]:
    backend = BashBackend("bash", {})
    cfg = backend.session_config(dict(config))
    assert isinstance(cfg, BashConfig)
    state = await backend.initialize("w", cfg)
    try:
        yield backend, ToolContext(worker_id="w", session_id="s", state=state, config=cfg)
    finally:
        await backend.cleanup("w", SimpleNamespace(state=state))


async def run(backend: BashBackend, ctx: ToolContext[BashState], command: str, limit: float | None = None):
    return await backend.run(ctx, RunArgs(command=command, timeout=limit))


async def test_state_persists_between_commands():
    async with shell() as (b, ctx):
        await run(b, ctx, 'cd /tmp && export GREETING=hi; say() { echo "$GREETING $1"; }; declare -A m=([k]=v)')
        result = await run(b, ctx, "pwd; say there; echo ${m[k]}")
        assert result.stdout == "/tmp\nhi there\nv\n"
        assert result.exit_code == 0


async def test_stdout_stderr_and_exit_code_are_separate_and_exact():
    async with shell() as (b, ctx):
        result = await run(b, ctx, "printf 'no newline'; echo oops >&2; exit_code() { return 3; }; exit_code")
        assert result.stdout == "no newline"
        assert result.stderr == "oops\n"
        assert result.exit_code == 3


async def test_quotes_heredocs_and_unicode_pass_through_unchanged():
    async with shell() as (b, ctx):
        command = "cat <<'EOF'\n'single' \"double\" \\back $HOME `tick` 中文\nEOF"
        result = await run(b, ctx, command)
        assert result.stdout == "'single' \"double\" \\back $HOME `tick` 中文\n"


async def test_commands_cannot_read_the_shells_stdin():
    async with shell() as (b, ctx):
        result = await run(b, ctx, 'read -r line; echo "got:$line:$?"', limit=5)
        assert result.stdout == "got::1\n"
        assert (await run(b, ctx, "echo still-alive")).stdout == "still-alive\n"


async def test_a_timed_out_command_is_interrupted_and_the_shell_keeps_its_state():
    async with shell() as (b, ctx):
        await run(b, ctx, "export KEEP=1; cd /tmp")
        with pytest.raises(ExecutionTimeout) as caught:
            await run(b, ctx, "echo started; sleep 30; echo never", limit=0.5)
        assert caught.value.code == 2002
        assert caught.value.data["stdout"] == "started\n"  # partial output comes back
        assert "never" not in caught.value.data["stdout"]
        assert "state are kept" in caught.value.message
        result = await run(b, ctx, "echo $KEEP; pwd")
        assert result.stdout == "1\n/tmp\n"
        assert not result.shell_restarted


async def test_a_busy_builtin_loop_is_interrupted_too():
    async with shell() as (b, ctx):
        await run(b, ctx, "export KEEP=2")
        with pytest.raises(ExecutionTimeout):
            await run(b, ctx, "while true; do :; done", limit=0.3)
        assert (await run(b, ctx, "echo $KEEP")).stdout == "2\n"


async def test_background_jobs_from_earlier_commands_survive_a_timeout():
    async with shell() as (b, ctx):
        await run(b, ctx, "sleep 60 & echo $! > bg.pid")
        with pytest.raises(ExecutionTimeout):
            await run(b, ctx, "sleep 30", limit=0.3)
        pid = int((await run(b, ctx, "cat bg.pid")).stdout)
        assert await anyio.Path(f"/proc/{pid}").exists()


async def test_output_beyond_the_cap_keeps_head_and_tail():
    async with shell(max_output_bytes=4096) as (b, ctx):
        result = await run(b, ctx, "seq 1 100000")
        assert result.truncated
        assert result.stdout_bytes == len("".join(f"{i}\n" for i in range(1, 100001)))
        assert result.stdout.startswith("1\n2\n3\n")
        assert result.stdout.endswith("99999\n100000\n")
        assert "bytes omitted" in result.stdout
        assert len(result.stdout) < 4096 + 200


async def test_exit_restarts_a_fresh_shell_on_the_next_command():
    async with shell() as (b, ctx):
        await run(b, ctx, "export GONE=1")
        result = await run(b, ctx, "exit 7")
        assert result.exit_code == 7
        assert result.note
        assert "fresh shell" in result.note
        after = await run(b, ctx, "echo ${GONE:-unset}")
        assert after.shell_restarted
        assert after.stdout == "unset\n"


async def test_config_cwd_env_and_a_private_home():
    async with shell(cwd="/", env={"FOO": "bar"}) as (b, ctx):
        result = await run(b, ctx, "pwd; echo $FOO; echo $HOME")
        lines = result.stdout.splitlines()
        assert lines[:2] == ["/", "bar"]
        assert "agentflow-bash-" in lines[2]


async def test_the_servers_environment_does_not_leak_into_the_shell(monkeypatch):
    monkeypatch.setenv("SECRET_API_KEY", "hunter2")
    async with shell() as (b, ctx):
        assert (await run(b, ctx, "echo ${SECRET_API_KEY:-none}")).stdout == "none\n"


async def test_bad_config_is_refused_with_the_field_named():
    backend = BashBackend("bash", {})
    with pytest.raises(ValueError, match="does not exist"):
        backend.session_config({"cwd": "/no/such/dir"})
    with pytest.raises(ValueError, match="timeout"):
        backend.session_config({"timeout": -1})


async def test_nul_bytes_are_a_parameter_error():
    async with shell() as (b, ctx):
        with pytest.raises(ParameterError):
            await run(b, ctx, "echo a\0b")


async def test_cleanup_kills_everything_the_session_started_even_daemons():
    async with shell() as (b, ctx):
        tag = ctx.state.owner.tag
        scratch = ctx.state.scratch
        await run(b, ctx, "sleep 300 & setsid sleep 301 & (setsid sleep 302 &) ; nohup sleep 303 >/dev/null 2>&1 &")
        # the shell and four sleeps (background starts finish after the command returns)
        await eventually(lambda: len(_sleeps(session_pids(tag))) == 4, 10)
    await eventually(lambda: not session_pids(tag), 5)
    assert not await anyio.Path(scratch).exists()


def _sleeps(pids: list[int]) -> list[int]:
    found = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if fh.read().startswith(b"sleep\0"):
                    found.append(pid)
        except OSError:
            continue
    return found


async def test_cancelling_a_call_stops_its_command():
    async with shell() as (b, ctx):
        with anyio.move_on_after(0.3):
            await run(b, ctx, "sleep 40; touch should-not-exist")
        await run(b, ctx, "true")  # the shell answers again: the interrupted list is abandoned
        # this session's processes only: another test run on the machine may run `sleep 40` too
        sleeping = [pid for pid in session_pids(ctx.state.owner.tag) if procs.cmdline(pid) == ["sleep", "40"]]
        assert sleeping == []
        assert not await anyio.Path(ctx.state.scratch / "home" / "should-not-exist").exists()


needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs apt package bubblewrap")


@needs_bwrap
async def test_isolated_shell_sees_a_read_only_host_and_a_private_tmp(tmp_path):
    host_file = tmp_path / "host-secret"
    host_file.write_text("x")
    async with shell(isolation="bwrap") as (b, ctx):
        await run(b, ctx, "cd /; export KEEP=3")
        result = await run(b, ctx, "pwd; echo $KEEP; touch /usr/af-test 2>&1 || true; ls /tmp; echo ok > ~/f; cat ~/f")
        lines = result.stdout.splitlines()
        assert lines[:2] == ["/", "3"]
        assert "Read-only file system" in result.stdout
        assert host_file.name not in result.stdout  # the host's /tmp is not visible
        assert lines[-1] == "ok"  # home is writable
        assert (await run(b, ctx, "hostname")).stdout == "sandbox\n"


@needs_bwrap
async def test_isolated_shell_without_network_has_only_loopback():
    async with shell(isolation="bwrap", network=False) as (b, ctx):
        result = await run(b, ctx, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
        assert result.stdout.split() == ["lo"]


@needs_bwrap
async def test_isolated_shell_timeouts_and_cleanup_work_the_same():
    async with shell(isolation="bwrap") as (b, ctx):
        tag = ctx.state.owner.tag
        await run(b, ctx, "export KEEP=4; sleep 300 &")
        with pytest.raises(ExecutionTimeout) as caught:
            await run(b, ctx, "echo started; sleep 30; echo never", limit=0.5)
        assert caught.value.data["stdout"] == "started\n"
        assert "state are kept" in caught.value.message
        assert (await run(b, ctx, "echo $KEEP")).stdout == "4\n"
        assert len(session_pids(tag)) >= 3  # bwrap, its init, the shell, the background sleep
    await eventually(lambda: not session_pids(tag), 5)


CRASHING_SERVER = """
import anyio, sys
from backends.bash import BashBackend, RunArgs
from backends.base import ToolContext

async def main():
    backend = BashBackend("bash", {})
    config = backend.session_config({"isolation": "bwrap"})
    state = await backend.initialize("w", config)
    ctx = ToolContext(worker_id="w", session_id="s", state=state, config=config)
    await backend.run(ctx, RunArgs(command="sleep 300 &"))
    print(state.owner.tag, flush=True)
    await anyio.sleep(300)

anyio.run(main)
"""


@needs_bwrap
async def test_an_isolated_shell_dies_with_a_server_killed_outright():
    # `async with`: the process's pipes are closed while the event loop still runs (a transport
    # collected after its loop closed raises "Event loop is closed" in a later test).
    async with await anyio.open_process([sys.executable, "-c", CRASHING_SERVER], stderr=None) as server:
        try:
            assert server.stdout is not None
            leaks.note_server(server.pid)
            with anyio.fail_after(60):
                tag = (await server.stdout.receive()).decode().strip()
            await eventually(lambda: len(session_pids(tag)) >= 3, 10)
            server.kill()  # SIGKILL: no cleanup code runs
            await server.wait()
            await eventually(lambda: not session_pids(tag), 10)
            # its scratch directory is left; the next server start sweeps it, as here (a server of
            # another test run on this machine may start first and sweep it: that is fine too)
            scratch = Path(tempfile.gettempdir()) / tag.removeprefix("bash-")
            left = await anyio.Path(scratch).exists()
            assert scratch in sweep_orphan_dirs() or not left
            assert not await anyio.Path(scratch).exists()
        finally:
            if server.returncode is None:  # failed before the kill: aclose() would wait for it
                server.kill()
                await server.wait()
