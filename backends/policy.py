"""The operator's policy for a resource: isolation tier, network, limits, host access.

Policy belongs to whoever writes the manifest (`[resources.NAME.policy]`). A session's
config may ask for a *tighter* policy, never a looser one: `Policy.tightened` refuses a
loosening request with `PermissionDenied` (1006) naming the key. Order of tightness:
isolation `none` < `sandbox` < `gvisor`; network `none` < `internet` < `host` (a smaller
rank is tighter); limits: smaller is tighter; booleans that grant access: False is tighter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from session.errors import ParameterError, PermissionDenied

Isolation = Literal["none", "sandbox", "gvisor"]
Network = Literal["none", "internet", "host"]

#: Higher is tighter.
ISOLATION_RANK: dict[str, int] = {"none": 0, "sandbox": 1, "gvisor": 2}
#: Higher is looser.
NETWORK_RANK: dict[str, int] = {"none": 0, "internet": 1, "host": 2}
#: Names kept from the first contract: `isolation = "bwrap"`, `network = true/false`.
ISOLATION_ALIASES: dict[str, str] = {"bwrap": "sandbox"}


class Limits(BaseModel):
    """Per-session resource limits (cgroups where available, rlimits otherwise)."""

    model_config = ConfigDict(extra="forbid")

    pids: int = Field(512, ge=8, le=1_000_000, description="Processes and threads the session may have at once.")
    memory_mb: int = Field(2048, ge=16, le=1_048_576, description="Memory (MB) the session's processes may use.")
    disk_mb: int = Field(1024, ge=1, le=1_048_576, description="Size (MB) of the session's writable home and /tmp.")
    cpu: float = Field(1.0, gt=0, le=256, description="CPU cores' worth of time per second (a quota).")


class Mount(BaseModel):
    """A host directory the operator grants to sessions (clients cannot add these)."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(description="Absolute host path.")
    path: str | None = Field(None, description="Where the session sees it (default: the same path).")
    mode: Literal["ro", "rw"] = "ro"

    @field_validator("host", "path")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must be an absolute path")
        return value


class Policy(BaseModel):
    """What a session of one resource may do; the manifest sets it, sessions may tighten it."""

    model_config = ConfigDict(extra="forbid")

    #: Session-config keys that are policy requests rather than backend config.
    REQUEST_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"isolation", "network", "limits", "allow_file_urls", "allow_private_hosts"}
    )

    isolation: Isolation = Field("sandbox", description="none < sandbox (bubblewrap) < gvisor (runsc).")
    network: Network = Field("none", description="none < internet (user-mode, no host/private ranges) < host.")
    limits: Limits = Field(
        default_factory=Limits, description="Per-session limits: pids, memory_mb, disk_mb, cpu (smaller is tighter)."
    )
    allow_file_urls: bool = Field(False, description="Browser: may pages open file:// URLs.")
    allow_private_hosts: list[str] = Field(
        default_factory=list,
        description="Browser: loopback/private hosts or addresses pages may reach (default: none).",
    )
    mounts: list[Mount] = Field(default_factory=list, description="Host directories granted to sessions.")

    @field_validator("isolation", mode="before")
    @classmethod
    def _isolation_alias(cls, value: Any) -> Any:
        return ISOLATION_ALIASES.get(value, value) if isinstance(value, str) else value

    @field_validator("network", mode="before")
    @classmethod
    def _network_alias(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "internet" if value else "none"
        return value

    def tightened(self, request: Mapping[str, Any]) -> Policy:
        """This policy narrowed by a session's request.

        Raises:
            PermissionDenied: the request would loosen a key (1006, naming it).
            ParameterError: a requested value is malformed (1002).
        """
        if not request:
            return self
        unknown = set(request) - self.REQUEST_KEYS
        if unknown:
            raise ParameterError(f"unknown policy keys: {', '.join(sorted(unknown))}")
        merged = self.model_dump()
        if "limits" in request:
            if not isinstance(request["limits"], Mapping):
                raise ParameterError("limits must be an object such as {'memory_mb': 512}")
            merged["limits"] = {**merged["limits"], **request["limits"]}
        for key in ("isolation", "network", "allow_file_urls", "allow_private_hosts"):
            if key in request:
                merged[key] = request[key]
        try:
            wanted = Policy.model_validate(merged)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ParameterError(f"invalid policy request {where!r}: {first['msg']}") from None
        self._check_not_looser(wanted)
        return wanted

    def _check_not_looser(self, wanted: Policy) -> None:
        def refuse(key: str, asked: Any, allowed: Any) -> None:
            raise PermissionDenied(
                f"policy key {key!r}: the operator's policy allows {allowed!r}; a session may only tighten it "
                f"(asked for {asked!r}). Change [resources.<name>.policy] in the manifest to allow more."
            )

        if ISOLATION_RANK[wanted.isolation] < ISOLATION_RANK[self.isolation]:
            refuse("isolation", wanted.isolation, self.isolation)
        if NETWORK_RANK[wanted.network] > NETWORK_RANK[self.network]:
            refuse("network", wanted.network, self.network)
        for name in Limits.model_fields:
            if getattr(wanted.limits, name) > getattr(self.limits, name):
                refuse(f"limits.{name}", getattr(wanted.limits, name), getattr(self.limits, name))
        if wanted.allow_file_urls and not self.allow_file_urls:
            refuse("allow_file_urls", True, False)
        extra_hosts = set(wanted.allow_private_hosts) - set(self.allow_private_hosts)
        if extra_hosts:
            refuse("allow_private_hosts", sorted(extra_hosts), self.allow_private_hosts)
        if wanted.mounts != self.mounts:
            refuse("mounts", "a change", "only the manifest's mounts")


def split_policy_request(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate a session config into (backend config, policy request)."""
    backend_config = {k: v for k, v in config.items() if k not in Policy.REQUEST_KEYS}
    request = {k: v for k, v in config.items() if k in Policy.REQUEST_KEYS}
    return backend_config, request
