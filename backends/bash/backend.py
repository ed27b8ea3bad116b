"""`bash`: a persistent shell per session, inside the session's sandbox; `run` executes a command in it.

State (`cd`, exported variables, functions, background jobs) survives between calls. The
shell runs through `backends.sandbox.SessionSandbox` in the tier the operator's policy names
(`none`: own process group and cgroup; `sandbox`: bubblewrap, own uid, seccomp; `gvisor`:
runsc). Its environment is built here and handed to the sandbox whole: the server's own
environment never reaches it, and the session's `env` config only ever exists inside the
sandbox (never in a host-side process). `cwd` is a path inside the sandbox (default: the
home, a size-capped private directory). Cleanup is the sandbox's: every process the session
started dies by membership (cgroup, uid, pid namespace), however it tried to hide.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from backends.base import Backend, SessionSetup, ToolContext, tool
from backends.bash.limits import LimitWatch
from backends.bash.models import BashConfig, RunArgs, RunResult
from backends.bash.shell import PersistentShell
from backends.sandbox import SandboxSpec, SessionSandbox, mechanisms
from session.errors import BackendError, ExecutionTimeout, ParameterError

log = logging.getLogger(__name__)

#: Host variables a shell may inherit in tier `none` (the host is what it sees anyway).
PASSED_THROUGH = ("PATH", "LANG", "LC_ALL", "TZ")
#: The PATH of an isolated shell: the sandbox shows the host's /usr and merged-/usr links only.
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Niceness of a warm-pool shell until a caller takes it (`handed_out` moves it back to the
#: server's own). With a cpu cgroup per session the kernel ranks a niceness only among the
#: session's own tasks (bench/bench_pool_priority.py): it yields the CPU to other sessions
#: only once the sandbox also lowers the session cgroup's cpu weight (it does not yet).
POOL_NICE = 19
#: The session's loggable label in its environment: a diagnostic for people reading a process
#: table, never what cleanup relies on (that is sandbox membership).
SESSION_LABEL_ENV = "AGENTFLOW_SESSION"


@dataclass(slots=True)
class BashState:
    shell: PersistentShell
    sandbox: SessionSandbox
    home: Path
    """The home's host path (the shell sees it at `sandbox.home_path`)."""
    limits: LimitWatch


def shell_environment(setup: SessionSetup[BashConfig], home_inside: str) -> dict[str, str]:
    """The shell's whole environment: a few safe basics, then the session's `env` config over them."""
    env: dict[str, str] = {}
    if setup.policy.isolation == "none":
        env.update({k: os.environ[k] for k in PASSED_THROUGH if k in os.environ})
    else:
        env.update({k: os.environ[k] for k in ("LANG", "LC_ALL", "TZ") if k in os.environ})
        env["PATH"] = SANDBOX_PATH
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(
        HOME=home_inside,
        TERM="dumb",
        HISTFILE="/dev/null",
        PAGER="cat",
        GIT_PAGER="cat",
        **{SESSION_LABEL_ENV: setup.label},
    )
    env.update(setup.config.env)
    return env


class BashBackend(Backend[BashConfig, BashState]):
    description: ClassVar[str] = "A persistent bash shell per session, inside the session's sandbox."
    Config = BashConfig
    isolation_tiers: ClassVar[frozenset[str]] = frozenset({"none", "sandbox", "gvisor"})

    async def initialize(self, setup: SessionSetup[BashConfig]) -> BashState:
        config = setup.config
        home = setup.scratch / "home"
        spec = SandboxSpec(
            label=setup.label,
            policy=setup.policy,
            server_id=self.runtime.server_id,
            home=home,
            nice=POOL_NICE if setup.pooled else 0,
        )
        sandbox = await SessionSandbox.create(spec)
        try:
            shell = PersistentShell(
                sandbox,
                # No signal reset here: a server started in the background ignores SIGINT, and a
                # non-interactive bash cannot trap a signal ignored on entry, but `spawn` starts
                # every program with default dispositions (see SessionSandbox.spawn).
                argv=[config.shell, "--noprofile", "--norc"],
                env=shell_environment(setup, sandbox.home_path),
                cwd=config.cwd,
                max_output_bytes=config.max_output_bytes,
                progress_interval=config.progress_interval,
            )
            await shell.start()
        except BaseException:
            await sandbox.aclose()
            raise
        # A new session's cgroup counters start at zero: no read of them on the start path.
        return BashState(shell=shell, sandbox=sandbox, home=home, limits=LimitWatch(sandbox, fresh=True))

    async def handed_out(self, state: BashState) -> None:
        # Back to what a shell started for this caller would have: the server's own niceness.
        state.sandbox.renice(os.getpriority(os.PRIO_PROCESS, 0))

    async def kill(self, setup: SessionSetup[BashConfig], state: BashState) -> bool:
        state.shell.signal_kill()
        state.sandbox.kill_now()
        return True

    async def cleanup(self, setup: SessionSetup[BashConfig], state: BashState) -> None:
        await state.shell.kill()
        await state.sandbox.aclose()

    def describe(self, state: BashState) -> dict[str, Any]:
        return {
            **state.sandbox.describe(),
            "pids": state.sandbox.pids(),
            "host_home": str(state.home),
            "shell_pid": state.shell.shell_pid(),
            "shell_restarts": state.shell.restarts,
        }

    def status(self) -> dict[str, Any]:
        return {"sandbox": mechanisms()}

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
        # A command that hit a limit fails (a kill, a failed fork or write); checking only then
        # keeps the common, successful round trip free of cgroup reads.
        suspicious = result.exit_code != 0 or result.timed_out or result.shell_exited
        hit = ctx.state.limits.check(result.stderr) if suspicious else None
        notes = [hit.message] if hit else []
        if result.shell_exited and not result.timed_out:
            notes.append("the shell exited; the next command starts a fresh shell (cd, variables, functions reset)")
        note = "; ".join(notes) or None
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
        if hit is not None and (hit.killed or (result.exit_code != 0 and not result.timed_out)):
            raise BackendError(f"{hit.message}; the session stays usable", data=payload.model_dump())
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
