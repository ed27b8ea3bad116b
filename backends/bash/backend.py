"""`bash`: a persistent shell per session; `run` executes a command in it.

State (`cd`, exported variables, functions, background jobs) survives between calls.
The session's scratch directory (made and removed by the engine) holds its `HOME`, which
is also the working directory unless `cwd` is configured. The shell does not inherit the
server's environment (no API keys leak to the agent); `env` adds variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from backends.base import Backend, SessionSetup, ToolContext, tool
from backends.bash.isolation import bwrap_argv
from backends.bash.models import BashConfig, RunArgs, RunResult
from backends.bash.shell import PersistentShell
from backends.processes import ProcessGroupOwner
from session.errors import ExecutionTimeout, ParameterError

PASSED_THROUGH = ("PATH", "LANG", "LC_ALL", "TZ")


@dataclass(slots=True)
class BashState:
    shell: PersistentShell
    owner: ProcessGroupOwner
    home: Path


class BashBackend(Backend[BashConfig, BashState]):
    description: ClassVar[str] = "A persistent bash shell per session."
    Config = BashConfig
    isolation_tiers: ClassVar[frozenset[str]] = frozenset({"none", "sandbox"})

    async def initialize(self, setup: SessionSetup[BashConfig]) -> BashState:
        config = setup.config
        home = setup.scratch / "home"
        home.mkdir()
        owner = ProcessGroupOwner(setup.label)
        env = {k: os.environ[k] for k in PASSED_THROUGH if k in os.environ}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        env.update(HOME=str(home), TERM="dumb", HISTFILE="/dev/null", PAGER="cat", GIT_PAGER="cat")
        env.update(config.env)
        cwd = config.cwd or str(home)
        argv = [config.shell, "--noprofile", "--norc"]
        isolated = setup.policy.isolation != "none"
        if isolated:
            argv = bwrap_argv(argv, home=home, cwd=cwd, network=setup.policy.network != "none")
        shell = PersistentShell(
            owner,
            argv=argv,
            env=env,
            cwd=cwd,
            isolated=isolated,
            shell_name=Path(config.shell).name,
            max_output_bytes=config.max_output_bytes,
            progress_interval=config.progress_interval,
        )
        try:
            await shell.start()
        except BaseException:
            await owner.aclose()
            raise
        return BashState(shell=shell, owner=owner, home=home)

    async def cleanup(self, setup: SessionSetup[BashConfig], state: BashState) -> None:
        await state.shell.kill()
        await state.owner.aclose()

    def describe(self, state: BashState) -> dict[str, Any]:
        return {
            "pids": state.owner.pids(),
            "home": str(state.home),
            "shell_pid": state.shell.shell_pid(),
            "shell_restarts": state.shell.restarts,
        }

    @tool(
        destructive=True,
        description=(
            "Run a bash command in this session's persistent shell and return stdout, stderr and "
            "exit_code. State persists between calls in a session (cd, exported variables, functions, "
            "background jobs). Stdin is /dev/null, so interactive prompts fail instead of hanging. "
            "A command running past its timeout is killed (error 2002, with the output so far) and "
            "the shell stays usable. Output over the cap keeps its start and end (truncated=true)."
        ),
    )
    async def run(self, ctx: ToolContext[BashConfig, BashState], args: RunArgs) -> RunResult:
        config = ctx.config
        if "\0" in args.command:
            raise ParameterError("command contains a NUL byte, which bash cannot run")
        if ctx.state.shell.heredoc_end in args.command:
            raise ParameterError("command contains this shell's reserved end-of-command marker")
        timeout = args.timeout or config.timeout
        result = await ctx.state.shell.run(args.command, timeout, ctx.progress)
        note = None
        if result.shell_exited and not result.timed_out:
            note = "the shell exited; the next command starts a fresh shell (cd, variables, functions reset)"
        payload = RunResult(
            stdout=result.stdout,
            stderr=result.stderr,
            exit_code=result.exit_code,
            truncated=result.truncated,
            stdout_bytes=result.stdout_bytes,
            stderr_bytes=result.stderr_bytes,
            duration_ms=result.duration_ms,
            shell_restarted=result.shell_restarted,
            note=note,
        )
        if result.timed_out:
            kept = (
                "the shell could not be recovered and will restart on the next command (state lost)"
                if result.shell_exited
                else "the shell and its state are kept"
            )
            raise ExecutionTimeout(
                f"command timed out after {timeout:g}s and was killed; {kept}. "
                "Pass a larger 'timeout', or run it in the background (cmd > log 2>&1 &) and poll.",
                data=payload.model_dump(),
            )
        return payload
