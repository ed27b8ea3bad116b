"""`bash`: a persistent shell per session; `run` executes a command in it.

State (`cd`, exported variables, functions, background jobs) survives between calls.
Each session gets a private scratch directory as `HOME` (and as the working directory
unless `cwd` is configured), deleted with the session. The shell does not inherit the
server's environment (no API keys leak to the agent); `env` adds variables.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field, field_validator

from backends.base import Backend, SessionInfo, ToolContext, tool
from backends.bash.isolation import bwrap_argv
from backends.bash.shell import PersistentShell
from backends.processes import ProcessGroupOwner, make_scratch_dir
from session.errors import ExecutionTimeout, ParameterError

MAX_TIMEOUT = 3600.0
PASSED_THROUGH = ("PATH", "LANG", "LC_ALL", "TZ")


class BashConfig(BaseModel):
    """Session config of `bash`."""

    model_config = ConfigDict(extra="forbid")

    cwd: str | None = Field(
        default=None,
        description="Working directory the shell starts in (must exist); default: the session's scratch dir.",
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables.")
    timeout: float = Field(default=30.0, gt=0, le=MAX_TIMEOUT, description="Default per-command timeout in seconds.")
    max_output_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        le=512 * 1024,
        description="Per-stream output cap; beyond it the middle of the output is dropped.",
    )
    shell: str = Field(default="/bin/bash", description="The bash binary.")
    progress_interval: float = Field(
        default=5.0, gt=0, le=300, description="Seconds between progress reports of a long command."
    )
    isolation: Literal["none", "bwrap"] = Field(
        default="none",
        description=(
            "'bwrap': run the shell in bubblewrap namespaces (read-only host, private /tmp, "
            "writable home, own PID namespace; dies with the server)."
        ),
    )
    network: bool = Field(default=True, description="With isolation 'bwrap': false leaves only loopback.")

    @field_validator("cwd")
    @classmethod
    def _cwd_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"directory {value!r} does not exist")
        return value


class RunArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    command: str = Field(
        min_length=1,
        description="Bash command line to run in the session's shell (pipes, &&, heredocs all work).",
    )
    timeout: float | None = Field(
        default=None,
        gt=0,
        le=MAX_TIMEOUT,
        description="Seconds before the command is interrupted (default: the session's timeout, 30 s).",
    )


class RunResult(BaseModel):
    stdout: str
    stderr: str
    exit_code: int | None
    truncated: bool = Field(description="True if a stream exceeded the cap and its middle was dropped.")
    stdout_bytes: int
    stderr_bytes: int
    duration_ms: float
    shell_restarted: bool = Field(
        default=False, description="The previous shell had exited; this command ran in a fresh one."
    )
    note: str | None = None


@dataclass(slots=True)
class BashState:
    shell: PersistentShell
    owner: ProcessGroupOwner
    scratch: Path


class BashBackend(Backend[BashConfig, BashState]):
    description = "A persistent bash shell per session."
    Config = BashConfig

    async def initialize(self, worker_id: str, config: BashConfig) -> BashState:
        scratch = make_scratch_dir("agentflow-bash-")
        home = scratch / "home"
        home.mkdir()
        owner = ProcessGroupOwner(f"bash-{scratch.name}")
        env = {k: os.environ[k] for k in PASSED_THROUGH if k in os.environ}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        env.update(HOME=str(home), TERM="dumb", HISTFILE="/dev/null", PAGER="cat", GIT_PAGER="cat")
        env.update(config.env)
        cwd = config.cwd or str(home)
        argv = [config.shell, "--noprofile", "--norc"]
        if config.isolation == "bwrap":
            argv = bwrap_argv(argv, home=home, cwd=cwd, network=config.network)
        shell = PersistentShell(
            owner,
            argv=argv,
            env=env,
            cwd=cwd,
            isolated=config.isolation != "none",
            shell_name=Path(config.shell).name,
            max_output_bytes=config.max_output_bytes,
            progress_interval=config.progress_interval,
        )
        try:
            await shell.start()
        except BaseException:
            await owner.aclose()
            await anyio.to_thread.run_sync(shutil.rmtree, scratch, True)
            raise
        return BashState(shell=shell, owner=owner, scratch=scratch)

    async def cleanup(self, worker_id: str, session_info: SessionInfo) -> None:
        state: BashState = session_info.state
        await state.shell.kill()
        await state.owner.aclose()
        await anyio.to_thread.run_sync(shutil.rmtree, state.scratch, True)

    def describe(self, state: BashState) -> dict[str, Any]:
        return {
            "pids": state.owner.pids(),
            "scratch_dir": str(state.scratch),
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
    async def run(self, ctx: ToolContext[BashState], args: RunArgs) -> RunResult:
        config = ctx.config
        assert isinstance(config, BashConfig)
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
