"""The bash backend against a real bash: persistence, timeouts, caps, cleanup.

Tests taking the `executor` fixture run twice: on the backend directly (local) and in a
session on a Ray session host, reached through a Ray front end's `bash_run` calls. The
others read the session's state or scratch directory (not reachable through a front end)
and run locally only.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from backends.base import ToolContext
from backends.bash import BashBackend, BashConfig, BashState, RunArgs
from backends.bash.models import RunResult
from backends.policy import Policy
from session.errors import ERROR_CLASSES, BackendError, ExecutionTimeout, ParameterError, SandboxError
from session.models import Caller
from tests.backend_sessions import backend_session
from tests.executors import Driver, ExecutorFactory, manifest_of
from tests.sandbox.helpers import CHAINS, use_chain
from tests.security.bash_sandbox import Client, bash_engine, pid_alive, require_tier
from tests.support import procs
from tests.support.polling import eventually


class RemoteShell:
    """A bash session on a Ray session host, used through `bash_run` calls by handle."""

    def __init__(self, driver: Driver, session_id: str) -> None:
        self.driver = driver
        self.session_id = session_id

    async def run(self, command: str, limit: float | None) -> RunResult:
        args: dict[str, object] = {"command": command, "session_id": self.session_id}
        if limit is not None:
            args["timeout"] = limit
        envelope = (await self.driver.call_tool(CALLER, "bash_run", args)).envelope
        if not envelope.ok:
            raise ERROR_CLASSES.get(envelope.code, SandboxError)(envelope.message, data=envelope.data)
        return RunResult.model_validate(envelope.data)


CALLER = Caller("local", "bash-tests")


@asynccontextmanager
async def shell(
    policy: Policy | None = None, *, on: ExecutorFactory | None = None, **config: object
) -> AsyncIterator[tuple[BashBackend | RemoteShell, ToolContext[BashConfig, BashState] | None]]:
    """A bash session without the sandbox (these tests are about the shell; tests/security covers tiers).

    `on` a ray executor: the same session on a Ray session host (no context: its state is remote).
    """
    policy = policy or Policy(isolation="none")
    if on is not None and on.kind == "ray":
        manifest = manifest_of({"bash": "backends.bash:BashBackend"}, policies={"bash": policy.model_dump(mode="json")})
        async with on(manifest) as driver:
            made = (await driver.call_tool(CALLER, "create_session", {"resource": "bash", "config": config})).envelope
            if not made.ok:
                raise ERROR_CLASSES.get(made.code, SandboxError)(made.message, data=made.data)
            yield RemoteShell(driver, made.data["session_id"]), None
        return
    backend = BashBackend("bash")
    async with backend_session(backend, config, policy=policy) as ctx:
        yield backend, ctx


async def run(
    backend: BashBackend | RemoteShell,
    ctx: ToolContext[BashConfig, BashState] | None,
    command: str,
    limit: float | None = None,
) -> RunResult:
    if isinstance(backend, RemoteShell):
        return await backend.run(command, limit)
    assert ctx is not None
    return await backend.run(ctx, RunArgs(command=command, timeout=limit))


async def test_state_persists_between_commands(executor):
    async with shell(on=executor) as (b, ctx):
        await run(b, ctx, 'cd /tmp && export GREETING=hi; say() { echo "$GREETING $1"; }; declare -A m=([k]=v)')
        result = await run(b, ctx, "pwd; say there; echo ${m[k]}")
        assert result.stdout == "/tmp\nhi there\nv\n"
        assert result.exit_code == 0


async def test_stdout_stderr_and_exit_code_are_separate_and_exact(executor):
    async with shell(on=executor) as (b, ctx):
        result = await run(b, ctx, "printf 'no newline'; echo oops >&2; exit_code() { return 3; }; exit_code")
        assert result.stdout == "no newline"
        assert result.stderr == "oops\n"
        assert result.exit_code == 3


async def test_quotes_heredocs_and_unicode_pass_through_unchanged(executor):
    async with shell(on=executor) as (b, ctx):
        command = "cat <<'EOF'\n'single' \"double\" \\back $HOME `tick` 中文\nEOF"
        result = await run(b, ctx, command)
        assert result.stdout == "'single' \"double\" \\back $HOME `tick` 中文\n"


async def test_commands_cannot_read_the_shells_stdin(executor):
    async with shell(on=executor) as (b, ctx):
        result = await run(b, ctx, 'read -r line; echo "got:$line:$?"', limit=5)
        assert result.stdout == "got::1\n"
        assert (await run(b, ctx, "echo still-alive")).stdout == "still-alive\n"


async def test_a_timed_out_command_is_interrupted_and_the_shell_keeps_its_state(executor):
    async with shell(on=executor) as (b, ctx):
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


async def test_a_busy_builtin_loop_is_interrupted_too(executor):
    async with shell(on=executor) as (b, ctx):
        await run(b, ctx, "export KEEP=2")
        with pytest.raises(ExecutionTimeout):
            await run(b, ctx, "while true; do :; done", limit=0.3)
        assert (await run(b, ctx, "echo $KEEP")).stdout == "2\n"


async def test_background_jobs_from_earlier_commands_survive_a_timeout(executor):
    async with shell(on=executor) as (b, ctx):
        await run(b, ctx, "sleep 60 & echo $! > bg.pid")
        with pytest.raises(ExecutionTimeout):
            await run(b, ctx, "sleep 30", limit=0.3)
        pid = int((await run(b, ctx, "cat bg.pid")).stdout)
        assert await anyio.Path(f"/proc/{pid}").exists()


async def test_output_beyond_the_cap_keeps_head_and_tail(executor):
    async with shell(on=executor, max_output_bytes=4096) as (b, ctx):
        result = await run(b, ctx, "seq 1 100000")
        assert result.truncated
        assert result.stdout_bytes == len("".join(f"{i}\n" for i in range(1, 100001)))
        assert result.stdout.startswith("1\n2\n3\n")
        assert result.stdout.endswith("99999\n100000\n")
        assert "bytes omitted" in result.stdout
        assert len(result.stdout) < 4096 + 200


async def test_a_stderr_flood_before_any_stdout_is_read_whole(executor):
    # More than a pipe and asyncio's buffer hold on stderr while stdout is still silent: the
    # quick one-stream read must hand over to reading both, not wait for the timeout.
    async with shell(on=executor, max_output_bytes=4096) as (b, ctx):
        result = await run(b, ctx, "head -c 600000 /dev/zero | tr '\\0' e >&2; echo done", limit=20)
        assert result.exit_code == 0
        assert result.stdout == "done\n"
        assert result.stderr_bytes == 600000
        assert result.stderr.startswith("eee")


async def test_output_without_a_final_newline_and_slow_commands_are_exact(executor):
    async with shell(on=executor) as (b, ctx):
        slow = await run(b, ctx, "sleep 0.2; printf out; printf err >&2; (exit 4)")
        assert (slow.stdout, slow.stderr, slow.exit_code) == ("out", "err", 4)
        for _ in range(3):  # back to back: nothing of one command's sentinels leaks into the next
            quick = await run(b, ctx, "printf a; printf b >&2")
            assert (quick.stdout, quick.stderr, quick.exit_code) == ("a", "b", 0)


async def test_what_an_exiting_shell_printed_last_is_kept(executor):
    async with shell(on=executor) as (b, ctx):
        result = await run(b, ctx, "echo bye; echo last words >&2; exit 5")
        assert result.exit_code == 5
        assert result.stdout == "bye\n"
        assert "last words" in result.stderr


async def test_exit_restarts_a_fresh_shell_on_the_next_command(executor):
    async with shell(on=executor) as (b, ctx):
        await run(b, ctx, "export GONE=1")
        result = await run(b, ctx, "exit 7")
        assert result.exit_code == 7
        assert result.note
        assert "fresh shell" in result.note
        after = await run(b, ctx, "echo ${GONE:-unset}")
        assert after.shell_restarted
        assert after.stdout == "unset\n"


@pytest.mark.parametrize("tier", ["none", "sandbox", "gvisor"])
async def test_config_cwd_env_and_a_private_home(tier):
    require_tier(tier)
    async with shell(Policy(isolation=tier), cwd="/", env={"FOO": "bar baz", "LANG": "C.UTF-8"}) as (b, ctx):
        result = await run(b, ctx, 'pwd; echo "$FOO"; echo "$HOME"; echo ok > ~/f && cat ~/f')
        lines = result.stdout.splitlines()
        assert lines[:2] == ["/", "bar baz"]
        assert lines[2] == (str(ctx.session.scratch / "home") if tier == "none" else "/home/user")
        assert lines[3] == "ok"
        # The home the shell writes is the host directory the session's details name.
        assert (ctx.state.home / "f").read_text() == "ok\n"


@pytest.mark.parametrize("tier", ["none", "sandbox", "gvisor"])
async def test_the_servers_environment_does_not_leak_into_the_shell(monkeypatch, tier):
    require_tier(tier)
    monkeypatch.setenv("SECRET_API_KEY", "hunter2")
    async with shell(Policy(isolation=tier)) as (b, ctx):
        assert (await run(b, ctx, "echo ${SECRET_API_KEY:-none}")).stdout == "none\n"


async def test_bad_config_is_refused_with_the_field_named():
    backend = BashBackend("bash")
    for bad, field in (
        ({"cwd": "relative/dir"}, "cwd"),
        ({"timeout": -1}, "timeout"),
        ({"env": {"A=B": "x"}}, "env"),
        ({"env": {"1ABC": "x"}}, "env"),
        ({"env": {"--clearenv": "x"}}, "env"),
        ({"env": {"A": "x\0y"}}, "env"),
        ({"shell": "bash"}, "shell"),
    ):
        with pytest.raises(ParameterError, match=field):
            backend.session_config(bad)


@pytest.mark.parametrize("tier", ["none", "sandbox"])
async def test_a_cwd_missing_inside_the_sandbox_is_refused_at_start(tier):
    require_tier(tier)
    with pytest.raises(ParameterError, match="not a directory inside"):
        async with shell(Policy(isolation=tier), cwd="/no/such/dir"):
            pass


async def test_cwd_is_a_path_inside_the_sandbox(executor):
    require_tier("sandbox")
    async with shell(SANDBOX, on=executor, cwd="/usr/share") as (b, ctx):
        assert (await run(b, ctx, "pwd")).stdout == "/usr/share\n"
        await run(b, ctx, "exit 3")
        # A fresh shell (after exit) starts in the configured directory again.
        assert (await run(b, ctx, "pwd")).stdout == "/usr/share\n"


async def test_nul_bytes_are_a_parameter_error(executor):
    async with shell(on=executor) as (b, ctx):
        with pytest.raises(ParameterError):
            await run(b, ctx, "echo a\0b")


@pytest.mark.parametrize("tier", ["none", "sandbox"])
async def test_cleanup_kills_everything_the_session_started_even_daemons(tier):
    require_tier(tier)
    async with shell(Policy(isolation=tier)) as (b, ctx):
        scratch = ctx.session.scratch
        await run(
            b,
            ctx,
            "sleep 300 & setsid sleep 301 & (setsid sleep 302 &) ; nohup sleep 303 >/dev/null 2>&1 & "
            "env -i setsid sleep 304 >/dev/null 2>&1 &",
        )
        # five sleeps (background starts finish after the command returns), found by sandbox membership
        await eventually(lambda: len(_sleeps(ctx.state.sandbox.pids())) == 5, 10)
        members = ctx.state.sandbox.pids()
    assert not [pid for pid in members if pid_alive(pid)]
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


@pytest.mark.parametrize("tier", ["none", "sandbox", "gvisor"])
async def test_cancelling_a_call_stops_its_command(tier):
    require_tier(tier)
    async with shell(Policy(isolation=tier)) as (b, ctx):
        with anyio.move_on_after(0.3):
            await run(b, ctx, "sleep 40; touch should-not-exist")
        await run(b, ctx, "true")  # the shell answers again: the interrupted list is abandoned
        # this session's processes only: another test run on the machine may run `sleep 40` too
        sleeping = [pid for pid in ctx.state.sandbox.pids() if procs.cmdline(pid) == ["sleep", "40"]]
        assert sleeping == []
        assert not await anyio.Path(ctx.state.home / "should-not-exist").exists()


async def test_a_cancelled_call_interrupts_its_command(executor):
    # On Ray the front end cancels the call on the host (ray.cancel), which interrupts the command.
    async with shell(on=executor) as (b, ctx):
        with anyio.move_on_after(0.5):
            await run(b, ctx, "sleep 41.2345; touch should-not-exist")

        async def interrupted() -> bool:
            check = await run(b, ctx, "pgrep -fx 'sleep 41.2345' >/dev/null && echo running || echo gone")
            return check.stdout == "gone\n"

        await eventually(interrupted, 15, what="the cancelled command to be interrupted")
        assert (await run(b, ctx, "ls should-not-exist 2>/dev/null || echo absent")).stdout == "absent\n"


SANDBOX = Policy(isolation="sandbox", network="none")


async def test_isolated_shell_sees_a_read_only_host_and_a_private_tmp(tmp_path, executor):
    require_tier("sandbox")
    host_file = tmp_path / "host-secret"
    host_file.write_text("x")
    async with shell(SANDBOX, on=executor) as (b, ctx):
        await run(b, ctx, "cd /; export KEEP=3")
        result = await run(b, ctx, "pwd; echo $KEEP; touch /usr/af-test 2>&1 || true; ls /tmp; echo ok > ~/f; cat ~/f")
        lines = result.stdout.splitlines()
        assert lines[:2] == ["/", "3"]
        assert "Read-only file system" in result.stdout
        assert host_file.name not in result.stdout  # the host's /tmp is not visible
        assert lines[-1] == "ok"  # home is writable
        assert (await run(b, ctx, "hostname")).stdout == "sandbox\n"
        assert (await run(b, ctx, "echo $HOME")).stdout == "/home/user\n"


async def test_isolated_shell_without_network_has_only_loopback(executor):
    require_tier("sandbox")
    async with shell(SANDBOX, on=executor) as (b, ctx):
        result = await run(b, ctx, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
        assert result.stdout.split() == ["lo"]


@pytest.mark.parametrize("tier", ["none", "sandbox", "gvisor"])
async def test_timeouts_keep_the_shell_and_its_jobs_in_every_tier(tier, executor):
    require_tier(tier)
    async with shell(Policy(isolation=tier), on=executor) as (b, ctx):
        await run(b, ctx, "export KEEP=4; sleep 300 & echo $! > bg.pid")
        with pytest.raises(ExecutionTimeout) as caught:
            await run(b, ctx, "echo started; sleep 30; echo never", limit=0.5)
        assert caught.value.data["stdout"] == "started\n"
        assert "state are kept" in caught.value.message
        with pytest.raises(ExecutionTimeout):
            await run(b, ctx, "while true; do :; done", limit=0.3)
        after = await run(b, ctx, "echo $KEEP; kill -0 $(cat bg.pid) && echo bg-alive")
        assert after.stdout == "4\nbg-alive\n"
        assert not after.shell_restarted


@pytest.mark.parametrize("tier", ["none", "sandbox", "gvisor"])
async def test_describe_and_status_show_the_sandbox(tier):
    require_tier(tier)
    async with shell(Policy(isolation=tier)) as (b, ctx):
        info = b.describe(ctx.state)
        assert info["tier"] == tier
        assert info["pids"]
        assert info["shell_pid"] in info["pids"] or tier == "gvisor"
        assert info["limits"]["pids"] == 512
        assert info["limits_mechanism"]
        if tier != "none":
            assert info["uid"] != os.getuid()
        status = b.status()
        assert set(status["sandbox"]["tiers"]) == {"none", "sandbox", "gvisor"}


async def test_a_shell_that_cannot_start_is_a_clear_error():
    require_tier("sandbox")
    with pytest.raises(BackendError, match="did not start inside the sandbox"):
        async with shell(SANDBOX, shell="/no/such/bash"):
            pass


async def test_get_status_and_list_sessions_show_the_sandbox():
    require_tier("sandbox")
    async with bash_engine(SANDBOX) as engine:
        client = Client(engine, "w")
        status = await client.call("get_status")
        assert status.ok, status.message
        mechanisms = status.data["backends"]["bash"]["sandbox"]
        assert mechanisms["tiers"]["sandbox"] == "available"
        assert mechanisms["limits_mechanism"]
        sid = await client.create({"limits": {"memory_mb": 300}})
        details = client.details(sid)
        assert details["tier"] == "sandbox"
        assert details["limits"]["memory_mb"] == 300
        assert details["uid"] != os.getuid()
        assert details["shell_pid"] in details["pids"]
        [view] = engine.list_sessions(client.caller)
        assert view.policy["isolation"] == "sandbox"
        assert view.policy["limits"]["memory_mb"] == 300


async def test_shell_options_and_function_purges_do_not_break_the_protocol(executor):
    async with shell(on=executor) as (b, ctx):
        await run(b, ctx, "set -u -o pipefail; unset -f $(declare -F | awk '{print $3}') 2>/dev/null; trap - INT")
        assert (await run(b, ctx, "echo still; false")).stdout == "still\n"
        with pytest.raises(ExecutionTimeout):
            await run(b, ctx, "sleep 30", limit=0.3)
        after = await run(b, ctx, "echo $-")
        assert "u" in after.stdout
        assert not after.shell_restarted


@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("tier", ["none", "sandbox"])
async def test_a_server_started_with_sigint_ignored_still_interrupts_commands(tier, chain, monkeypatch):
    """`agentflow-sandbox serve &` from a script ignores SIGINT; its shells must not inherit that.

    The backend starts bash directly: the sandbox's spawn resets dispositions (the launcher,
    or `env --default-signal` in the fallback chain)."""
    require_tier(tier)
    use_chain(chain, monkeypatch)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        async with shell(Policy(isolation=tier)) as (b, ctx):
            await run(b, ctx, "export KEEP=5")
            with pytest.raises(ExecutionTimeout):
                await run(b, ctx, "sleep 30; touch after-the-sleep", limit=0.5)
            after = await run(b, ctx, "echo $KEEP; ls after-the-sleep 2>/dev/null || echo abandoned")
            # the rest of the command line was abandoned (the shell got SIGINT), state kept
            assert after.stdout == "5\nabandoned\n"
            assert not after.shell_restarted
    finally:
        signal.signal(signal.SIGINT, previous)
