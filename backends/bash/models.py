"""The bash backend's session config, tool arguments and results (their schemas are what an LLM reads).

Isolation, network and limits are not here: they are the operator's policy
(`[resources.bash.policy]`, see `backends.policy`); a session may only tighten them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TIMEOUT = 3600.0


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


