"""The engine tests' view of an executor, so one test runs against both.

`LocalDriver` calls the local `Engine`'s methods directly (what these tests always did);
`RayDriver` reaches the same semantics through `RayExecutor.call`, the one entry point a
Ray front end has, turning error envelopes back into the exceptions the engine raises.
Both are built from the same manifest.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

from manifests.schema import Manifest
from mcp_server.factory import engine_from_manifest
from session.engine import Engine
from session.errors import ERROR_CLASSES, SandboxError
from session.models import Caller, SessionView
from session.tool_calls import CallOutcome

Config = Mapping[str, Any] | None

#: Backends by resource name, as import paths (a Ray host imports them by path).
FAKES = {"fake": "tests.fakes.FakeBackend", "search": "tests.fakes.SharedFake"}
TWO_FAKES = {"fake": "tests.fakes.FakeBackend", "other": "tests.fakes.FakeBackend"}


def manifest_of(
    backends: Mapping[str, str],
    *,
    session_ttl: float = 300.0,
    disconnect_grace: float = 60.0,
    per_resource: Mapping[str, int] | None = None,
    per_worker: int | None = None,
    per_principal: int | None = None,
    pools: Mapping[str, int] | None = None,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
    policies: Mapping[str, Mapping[str, Any]] | None = None,
) -> Manifest:
    resources: dict[str, Any] = {}
    for name, path in backends.items():
        spec: dict[str, Any] = {"backend_class": path}
        if per_resource and name in per_resource:
            spec["max_sessions"] = per_resource[name]
        if pools and name in pools:
            spec["pool"] = pools[name]
        if configs and name in configs:
            spec["config"] = dict(configs[name])
        if policies and name in policies:
            spec["policy"] = dict(policies[name])
        resources[name] = spec
    limits = {"max_sessions": None, "per_principal": per_principal, "per_worker": per_worker}
    return Manifest.model_validate(
        {
            "server": {"session_ttl": session_ttl, "disconnect_grace": disconnect_grace, "limits": limits},
            "resources": resources,
        }
    )


class Driver(Protocol):
    kind: str

    async def call_tool(self, caller: Caller | str | None, name: str, args: Mapping[str, Any]) -> CallOutcome: ...
    async def call(self, caller: Caller | str | None, name: str, args: Mapping[str, Any]) -> CallOutcome: ...
    async def create_sessions(
        self, caller: Caller | str, request: Any, config: Mapping[str, Any] | None = None
    ) -> list[tuple[SessionView, bool]]: ...
    async def destroy_sessions(
        self, caller: Caller | str, resources: list[str] | None = None, *, session_id: str | None = None
    ) -> list[SessionView]: ...
    async def list_sessions(self, caller: Caller | str, *, everything: bool = False) -> list[SessionView]: ...
    async def refresh_sessions(
        self, caller: Caller | str, resource: str | None = None, *, session_id: str | None = None
    ) -> list[SessionView]: ...
    async def reinitialize(
        self, caller: Caller | str, resource: str | None, config: Config, *, session_id: str | None = None
    ) -> dict[str, Any]: ...
    async def warmup(self, resources: list[str] | None = None) -> dict[str, str]: ...
    async def disconnect(self, worker_key: str) -> None: ...
    async def backend_attr(self, resource: str, attribute: str) -> Any: ...


class LocalDriver:
    kind = "local"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def call_tool(self, caller: Caller | str | None, name: str, args: Mapping[str, Any]) -> CallOutcome:
        return await self.engine.call(caller, name, args)

    call = call_tool

    async def create_sessions(
        self, caller: Caller | str, request: Any, config: Mapping[str, Any] | None = None
    ) -> list[tuple[SessionView, bool]]:
        return await self.engine.create_sessions(caller, request, config)

    async def destroy_sessions(
        self, caller: Caller | str, resources: list[str] | None = None, *, session_id: str | None = None
    ) -> list[SessionView]:
        return await self.engine.destroy_sessions(caller, resources, session_id=session_id)

    async def list_sessions(self, caller: Caller | str, *, everything: bool = False) -> list[SessionView]:
        return self.engine.list_sessions(caller, everything=everything)

    async def refresh_sessions(
        self, caller: Caller | str, resource: str | None = None, *, session_id: str | None = None
    ) -> list[SessionView]:
        return self.engine.refresh_sessions(caller, resource, session_id=session_id)

    async def reinitialize(
        self, caller: Caller | str, resource: str | None, config: Config, *, session_id: str | None = None
    ) -> dict[str, Any]:
        return await self.engine.reinitialize(caller, resource, config, session_id=session_id)

    async def warmup(self, resources: list[str] | None = None) -> dict[str, str]:
        return await self.engine.warmup(resources)

    async def disconnect(self, worker_key: str) -> None:
        self.engine.disconnect(worker_key)

    async def backend_attr(self, resource: str, attribute: str) -> Any:
        return getattr(self.engine.backends[resource], attribute)


def _raise_for(outcome: CallOutcome) -> dict[str, Any]:
    envelope = outcome.envelope
    if not envelope.ok:
        raise ERROR_CLASSES.get(envelope.code, SandboxError)(envelope.message, data=envelope.data)
    return envelope.data


def _views(items: list[dict[str, Any]]) -> list[SessionView]:
    return [SessionView.model_validate({k: v for k, v in item.items() if k != "created"}) for item in items]


class RayDriver:
    kind = "ray"

    def __init__(self, executor: Any) -> None:
        self.executor = executor

    async def call_tool(self, caller: Caller | str | None, name: str, args: Mapping[str, Any]) -> CallOutcome:
        outcome: CallOutcome = await self.executor.call(caller, name, args)
        return outcome

    call = call_tool

    async def _meta(self, caller: Caller | str | None, name: str, args: dict[str, Any]) -> dict[str, Any]:
        return _raise_for(await self.call_tool(caller, name, {k: v for k, v in args.items() if v is not None}))

    async def create_sessions(
        self, caller: Caller | str, request: Any, config: Mapping[str, Any] | None = None
    ) -> list[tuple[SessionView, bool]]:
        data = await self._meta(caller, "create_session", {"resource": request, "config": config})
        return [(view, item["created"]) for view, item in zip(_views(data["sessions"]), data["sessions"], strict=True)]

    async def destroy_sessions(
        self, caller: Caller | str, resources: list[str] | None = None, *, session_id: str | None = None
    ) -> list[SessionView]:
        data = await self._meta(caller, "destroy_session", {"resource": resources, "session_id": session_id})
        return _views(data["destroyed"])

    async def list_sessions(self, caller: Caller | str, *, everything: bool = False) -> list[SessionView]:
        return _views((await self._meta(caller, "list_sessions", {"all": everything}))["sessions"])

    async def refresh_sessions(
        self, caller: Caller | str, resource: str | None = None, *, session_id: str | None = None
    ) -> list[SessionView]:
        data = await self._meta(caller, "refresh_sessions", {"resource": resource, "session_id": session_id})
        return _views(data["refreshed"])

    async def reinitialize(
        self, caller: Caller | str, resource: str | None, config: Config, *, session_id: str | None = None
    ) -> dict[str, Any]:
        args = {"resource": resource, "config": config, "session_id": session_id}
        return await self._meta(caller, "reinitialize", args)

    async def warmup(self, resources: list[str] | None = None) -> dict[str, str]:
        backends: dict[str, str] = (await self._meta(None, "warmup", {"resources": resources}))["backends"]
        return backends

    async def disconnect(self, worker_key: str) -> None:
        await self.executor.disconnect_and_wait(worker_key)

    async def backend_attr(self, resource: str, attribute: str) -> Any:
        """The attribute of `resource`'s backend object on every host of it, combined (sets, lists, numbers)."""
        hosts = await self.executor.hosts_of(resource)
        values = [await host.actor.probe.remote(resource, attribute) for host in hosts]
        if not values:
            return set()
        first = values[0]
        if isinstance(first, set):
            return set().union(*values)
        if isinstance(first, list):
            return [item for value in values for item in value]
        return sum(values)


@asynccontextmanager
async def open_driver(kind: str, manifest: Manifest, ray_address: str | None = None) -> AsyncIterator[Driver]:
    """An executor of `kind` for `manifest`; a ray one gets a deployment of its own, stopped at the end."""
    if kind == "local":
        async with engine_from_manifest(manifest) as engine:
            yield LocalDriver(engine)
        return
    from cluster.executor import RayExecutor

    deployment = f"test-{secrets.token_hex(4)}"
    server = manifest.server.model_copy(update={"executor": "ray", "deployment": deployment})
    executor = RayExecutor(manifest.model_copy(update={"server": server}), address=ray_address)
    async with executor:
        try:
            yield RayDriver(executor)
        finally:
            await executor.stop_deployment()


class ExecutorFactory:
    """What the `executor` fixture gives a test: `async with executor(manifest) as engine:`."""

    def __init__(self, kind: str, ray_address: str | None) -> None:
        self.kind = kind
        self.ray_address = ray_address

    def __call__(self, manifest: Manifest) -> AbstractAsyncContextManager[Driver]:
        return open_driver(self.kind, manifest, self.ray_address)
