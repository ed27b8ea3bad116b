"""The bash backend's session config, tool arguments and results (their schemas are what an LLM reads).

Isolation, network and limits are not here: they are the operator's policy
(`[resources.bash.policy]`, see `backends.policy`); a session may only tighten them.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TIMEOUT = 3600.0
#: POSIX environment names (what `export` accepts); anything else could confuse a parser.
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_ENV_ENTRIES = 256
MAX_ENV_BYTES = 128 * 1024


class BashConfig(BaseModel):
    """Session config of `bash`."""

    model_config = ConfigDict(extra="forbid")

    cwd: str | None = Field(
        default=None,
        max_length=4096,
        description=(
            "Absolute path, as the shell sees it inside its sandbox, of the directory it starts in "
            "(must exist there); default: the session's home."
        ),
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment variables of the shell (set inside its sandbox only).",
    )
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
    def _cwd_absolute(cls, value: str | None) -> str | None:
        # Whether it exists is checked inside the sandbox when the shell starts, never on the host.
        if value is not None and (not value.startswith("/") or "\0" in value):
            raise ValueError("must be an absolute path (as seen inside the session) without NUL bytes")
        return value

    @field_validator("shell")
    @classmethod
    def _shell_absolute(cls, value: str) -> str:
        if not value.startswith("/") or "\0" in value:
            raise ValueError("must be an absolute path without NUL bytes")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_ENV_ENTRIES:
            raise ValueError(f"at most {MAX_ENV_ENTRIES} variables")
        size = 0
        for name, item in value.items():
            if not ENV_NAME.match(name):
                raise ValueError(f"variable name {name[:64]!r} is not a POSIX name ([A-Za-z_][A-Za-z0-9_]*)")
            if "\0" in item:
                raise ValueError(f"variable {name!r} contains a NUL byte")
            size += len(name) + len(item.encode("utf-8", "surrogateescape")) + 2
        if size > MAX_ENV_BYTES:
            raise ValueError(f"the variables take more than {MAX_ENV_BYTES} bytes")
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
