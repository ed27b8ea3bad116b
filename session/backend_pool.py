"""The engine's backends: lookup by resource or tool name, warm-up once, shutdown."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import anyio

from backends.base import Backend, BackendKind, ToolSpec
from session.errors import BackendError, ParameterError, ResourceTypeNotFound, SandboxError, ToolNotFound

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 30.0
# First words of the session-management tool names: a typo there is an unknown tool, not resource.
_NOT_RESOURCES = frozenset({"create", "destroy", "list", "refresh", "reinitialize", "warmup", "get"})


class BackendPool:
    """Owns the backend instances; shared and hybrid ones are warmed on first use."""

    def __init__(self, backends: Mapping[str, Backend[Any, Any]]) -> None:
        self.backends: dict[str, Backend[Any, Any]] = dict(backends)
        self._warm: set[str] = set()
        self._locks: dict[str, anyio.Lock] = {}

    def backend(self, resource: str) -> Backend[Any, Any]:
        """Raises: ResourceTypeNotFound (1005)."""
        try:
            return self.backends[resource]
        except KeyError:
            raise ResourceTypeNotFound(
                f"unknown resource type {resource!r}; this server has: {', '.join(sorted(self.backends))}"
            ) from None

    def session_backend(self, resource: str) -> Backend[Any, Any]:
        """Raises: ResourceTypeNotFound (1005); ParameterError (1002) for a shared backend."""
        backend = self.backend(resource)
        if backend.kind() is BackendKind.SHARED:
            raise ParameterError(f"{resource!r} is a shared backend: it has no sessions; call its tools directly")
        return backend

    def find_tool(self, name: str) -> tuple[str, ToolSpec]:
        """Resolve `resource:action` (or the MCP form `resource_action`) to a backend's tool.

        Raises: ToolNotFound (1001), ResourceTypeNotFound (1005).
        """
        resource, sep, action = name.partition(":")
        if not sep:
            for candidate in sorted(self.backends, key=len, reverse=True):
                if name.startswith(candidate + "_"):
                    resource, action = candidate, name[len(candidate) + 1 :]
                    break
            else:
                prefix = name.partition("_")[0]
                if prefix and prefix not in _NOT_RESOURCES:
                    raise ResourceTypeNotFound(
                        f"unknown resource type {prefix!r} (in tool {name!r}); "
                        f"this server has: {', '.join(sorted(self.backends))}"
                    )
                raise ToolNotFound(f"unknown tool {name!r}; tools are named resource_action, e.g. 'bash_run'")
        tools = self.backend(resource).tools()
        if action not in tools:
            raise ToolNotFound(
                f"resource {resource!r} has no tool {action!r}; its tools are: {', '.join(sorted(tools))}"
            )
        return resource, tools[action]

    def is_warm(self, resource: str) -> bool:
        return resource in self._warm

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
            }
            for name, b in sorted(self.backends.items())
        }
