"""The engine's backends: lookup by resource or tool name, warm-up once, shutdown."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import anyio

from backends.base import Backend, BackendKind, ToolSpec
from session.errors import BackendError, ParameterError, ResourceTypeNotFound, SandboxError, ToolNotFound, shown

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 30.0


class BackendPool:
    """Owns the backend instances; shared and hybrid ones are warmed on first use."""

    def __init__(self, backends: Mapping[str, Backend[Any, Any]]) -> None:
        self.backends: dict[str, Backend[Any, Any]] = dict(backends)
        self._warm: set[str] = set()
        self._locks: dict[str, anyio.Lock] = {}

    @staticmethod
    def checks_health(backend: Backend[Any, Any]) -> bool:
        """Whether the backend has a health check (the base one answers None without looking)."""
        return type(backend).health is not Backend.health

    def backend(self, resource: str) -> Backend[Any, Any]:
        """Raises: ResourceTypeNotFound (1005)."""
        backend = self.backends.get(resource) if isinstance(resource, str) else None
        if backend is None:
            raise ResourceTypeNotFound(
                f"unknown resource type {shown(resource, 60)}; this server has: {', '.join(sorted(self.backends))}"
            )
        return backend

    def session_backend(self, resource: str) -> Backend[Any, Any]:
        """Raises: ResourceTypeNotFound (1005); ParameterError (1002) for a shared backend."""
        backend = self.backend(resource)
        if backend.kind() is BackendKind.SHARED:
            raise ParameterError(f"{resource!r} is a shared backend: it has no sessions; call its tools directly")
        return backend

    def catalog(self) -> dict[str, ToolSpec]:
        """Every backend tool bound to its resource, by MCP name (`resource_action`)."""
        tools: dict[str, ToolSpec] = {}
        for resource, backend in sorted(self.backends.items()):
            takes_session = backend.kind() is not BackendKind.SHARED
            for spec in backend.tools().values():
                bound = spec.bound(resource, takes_session=takes_session)
                tools[bound.qualified_name] = bound
        return tools

    def find_tool(self, name: str, catalog: Mapping[str, ToolSpec]) -> ToolSpec:
        """Resolve an MCP name (`bash_run`, `create_session`) or `resource:action` to its tool.

        Raises: ToolNotFound (1001).
        """
        spec = catalog.get(name.replace(":", "_", 1) if ":" in name else name)
        if spec is not None:
            return spec
        resource = name.partition(":")[0] if ":" in name else None
        if resource is not None and resource not in self.backends:
            raise ToolNotFound(
                f"unknown tool {shown(name, 80)}: there is no resource {shown(resource, 40)}; "
                f"this server has: {', '.join(sorted(self.backends))}"
            )
        for candidate in self.backends:
            if name.startswith(candidate + "_") or name.startswith(candidate + ":"):
                actions = sorted(t.name for t in catalog.values() if t.resource == candidate)
                raise ToolNotFound(
                    f"resource {candidate!r} has no tool {shown(name[len(candidate) + 1:], 60)}; "
                    f"its tools are: {', '.join(actions)}"
                )
        raise ToolNotFound(
            f"unknown tool {shown(name, 80)}; tools are named resource_action (e.g. 'bash_run') or are "
            "session tools such as create_session; list_tools shows them all"
        )

    async def ensure_warm(self, resource: str) -> bool:
        """Warm a shared or hybrid backend once; True if this call did the warming.

        Raises: BackendError (2001) if warmup fails (the next use tries again).
        """
        backend = self.backend(resource)
        if resource in self._warm or backend.kind() is BackendKind.SESSION:
            return False
        lock = self._locks.setdefault(resource, anyio.Lock())
        async with lock:  # only users of this one backend wait for its warmup
            if resource in self._warm:
                return False
            try:
                await backend.warmup()
            except SandboxError:
                raise
            except Exception as exc:
                log.exception("warmup of %s failed", resource)
                raise BackendError(f"warmup of {resource!r} failed: {type(exc).__name__}: {exc}") from exc
            self._warm.add(resource)
            return True

    async def warmup(self, resources: list[str] | None = None) -> dict[str, str]:
        names = resources if resources is not None else sorted(self.backends)
        for name in names:
            self.backend(name)
        result: dict[str, str] = {}
        for name in names:
            if self.backend(name).kind() is BackendKind.SESSION:
                result[name] = "nothing to warm (per-session backend)"
            else:
                result[name] = "warmed" if await self.ensure_warm(name) else "already warm"
        return result

    async def shutdown(self) -> None:
        """Shut every warmed backend down; shielded, bounded, logged, never raises."""
        with anyio.CancelScope(shield=True):
            for name in sorted(self._warm):
                try:
                    with anyio.fail_after(SHUTDOWN_TIMEOUT):
                        await self.backends[name].shutdown()
                except Exception:
                    log.exception("shutdown of backend %s failed", name)
            self._warm.clear()

    def describe(self, live_by_resource: Mapping[str, int]) -> dict[str, Any]:
        return {
            name: {
                "kind": b.kind().value,
                "warm": name in self._warm if b.kind() is not BackendKind.SESSION else None,
                "live_sessions": live_by_resource.get(name, 0),
                "tools": sorted(b.tools()),
                **b.status(),
            }
            for name, b in sorted(self.backends.items())
        }
