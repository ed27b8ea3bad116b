"""The manifest's shape (the original system's config layout), validated with pydantic."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from manifests.credentials import principal_problem, token_problem

RESOURCE_NAME = r"^[a-z][a-z0-9]{0,31}$"
#: The warm pool's growth cap when a manifest names none: covers a 50-create burst; 64 idle
#: sandboxed shells hold ~70 MB (memory cgroups), 64 uids, 256 cgroup dirs, 128 tmpfs mounts.
DEFAULT_POOL_MAX = 64


class SessionLimits(BaseModel):
    """`[server.limits]`: how many sessions may be live. The defaults admit 200 concurrent
    workers of one principal with a few sessions each."""

    model_config = ConfigDict(extra="forbid")

    max_sessions: int | None = Field(default=1024, ge=1, description="Live sessions on the whole server.")
    per_principal: int | None = Field(default=1024, ge=1, description="Live sessions of one token's principal.")
    per_worker: int | None = Field(default=16, ge=1, description="Live sessions of one client (connection/key).")


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_ttl: float = Field(default=300.0, gt=0, description="Idle seconds before a session is reaped.")
    disconnect_grace: float = Field(
        default=60.0,
        ge=0,
        description="Seconds a disconnected client's sessions wait to be adopted by handle (capped at the TTL).",
    )
    transport: Literal["stdio", "sse", "http"] = "stdio"
    host: str = "127.0.0.1"
    port: int = Field(default=18890, ge=0, le=65535)
    limits: SessionLimits = Field(default_factory=SessionLimits)
    max_sessions: int | None = Field(
        default=None, ge=1, description="Deprecated spelling of limits.max_sessions (kept working)."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    tokens: dict[str, SecretStr] = Field(
        default_factory=dict,
        description=(
            "HTTP/SSE bearer tokens by principal name (each >= 32 characters; write ${VAR} to take one from "
            "the environment). AGENTFLOW_SANDBOX_TOKEN overrides them; with neither, one is generated at start."
        ),
    )
    max_connections: int = Field(
        default=512,
        ge=2,
        description="Open HTTP connections at once; beyond it requests get 503. A worker holds about two.",
    )
    header_timeout: float = Field(
        default=10.0, gt=0, description="Seconds a client has to send a request's headers, from its first byte."
    )
    keep_alive_timeout: float = Field(
        default=15.0, gt=0, description="Seconds an idle keep-alive connection stays open between requests."
    )
    executor: Literal["local", "ray"] = Field(
        default="local",
        description="Where sessions live: 'local' (in this process) or 'ray' (session hosts on a Ray cluster; "
        "this process becomes a stateless front end).",
    )
    ray_address: str | None = Field(
        default=None, description="The Ray cluster to join with executor 'ray' (e.g. '10.0.0.5:6379')."
    )
    deployment: str = Field(
        default="agentflow",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Ray namespace of this deployment's actors: front ends of one deployment share sessions; "
        "two deployments on one cluster never mix.",
    )
    ray_host_idle_exit: float = Field(
        default=60.0,
        gt=0,
        description="Executor 'ray': seconds a session host with no sessions and no live front end waits "
        "before it exits (its Ray actor ends).",
    )

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        seen: set[str] = set()
        for name, secret in value.items():
            token = secret.get_secret_value()
            problem = principal_problem(name) or token_problem(token)
            if problem:
                raise ValueError(f"principal {name!r}: {problem}")
            if token in seen:
                raise ValueError(f"principal {name!r}: the same token is given to two principals")
            seen.add(token)
        return value

    def token_map(self) -> dict[str, str]:
        """`tokens` with the secrets revealed, for the auth layer only."""
        return {name: secret.get_secret_value() for name, secret in self.tokens.items()}

    @model_validator(mode="after")
    def _legacy_max_sessions(self) -> ServerSettings:
        if self.max_sessions is not None:
            self.limits = self.limits.model_copy(update={"max_sessions": self.max_sessions})
        return self


class ResourceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    backend_class: str | None = Field(
        default=None,
        description="Import path 'package.module.Class' (or 'package.module:Class'); built-ins need none.",
    )
    config: dict[str, Any] = Field(default_factory=dict, description="Defaults for every session config.")
    settings: dict[str, Any] = Field(
        default_factory=dict, description="Backend-wide settings (one value per server; sessions cannot change them)."
    )
    policy: dict[str, Any] | None = Field(
        default=None,
        description="The operator's policy for these sessions (isolation, network, limits, ...); "
        "sessions may only tighten it. Omitted keys keep the backend's defaults.",
    )
    max_sessions: int | None = Field(default=None, ge=1, description="Live sessions of this resource.")
    nodes: list[str] | None = Field(
        default=None,
        description="Executor 'ray': run these sessions only on nodes advertising one of the custom resources "
        "'agentflow.node.LABEL' for these labels (every node must also advertise 'agentflow.NAME').",
    )
    pool: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="Sessions kept started with the default config and policy, so create_session and "
        "temporary calls take a ready one (each is used once, never recycled); the size when demand is "
        "low. 0: no pool at all.",
    )
    pool_max: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="The pool grows up to this many after bursts of demand (calls that wanted a pooled "
        "session within 0.5 s); default max(pool, 64). An idle sandboxed shell costs ~1 MB, one uid, 4 cgroup "
        "directories and 2 tmpfs mounts.",
    )
    pool_decay: float = Field(
        default=120.0,
        gt=0,
        le=86400,
        description="Seconds a grown pool keeps its size after the burst that grew it; then the surplus "
        "idle sessions are stopped (oldest first) and the pool falls back toward `pool`.",
    )

    @model_validator(mode="after")
    def _pool_bounds(self) -> ResourceSpec:
        if self.pool_max is not None and self.pool == 0:
            raise ValueError("pool_max needs pool >= 1 (pool = 0 turns the warm pool off)")
        if self.pool_max is not None and self.pool_max < self.pool:
            raise ValueError(f"pool_max ({self.pool_max}) must be at least pool ({self.pool})")
        return self

    def pool_cap(self) -> int:
        """The most members the pool may grow to (0 when there is no pool)."""
        if self.pool == 0:
            return 0
        return self.pool_max if self.pool_max is not None else max(self.pool, DEFAULT_POOL_MAX)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server: ServerSettings = Field(default_factory=ServerSettings)
    resources: dict[str, ResourceSpec] = Field(default_factory=dict)

    @field_validator("resources")
    @classmethod
    def _names(cls, value: dict[str, ResourceSpec]) -> dict[str, ResourceSpec]:
        import re

        for name in value:
            if not re.match(RESOURCE_NAME, name):
                raise ValueError(
                    f"resource name {name!r} must be a short lowercase word (letters and digits, "
                    "starting with a letter): it prefixes MCP tool names as name_action"
                )
        return value

    def enabled(self) -> dict[str, ResourceSpec]:
        return {name: spec for name, spec in self.resources.items() if spec.enabled}
