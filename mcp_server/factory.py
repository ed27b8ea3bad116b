"""Manifest -> engine: the one place a manifest's settings reach the session engine."""

from __future__ import annotations

from typing import cast

from backends.base import Runtime
from manifests import build_backends
from manifests.schema import Manifest
from session.budget import Limits
from session.engine import Engine
from session.errors import ConfigurationError
from session.warm_pool import PoolSize


def engine_from_manifest(manifest: Manifest, runtime: Runtime | None = None) -> Engine:
    """An engine with the manifest's enabled backends, TTL, grace and limits.

    Raises:
        ConfigurationError: a backend class or config in the manifest is wrong.
    """
    runtime = runtime if runtime is not None else Runtime.for_process()
    settings = manifest.server
    return Engine(
        build_backends(manifest, runtime),
        session_ttl=settings.session_ttl,
        disconnect_grace=settings.disconnect_grace,
        runtime=runtime,
        pools={
            name: PoolSize(spec.pool, spec.pool_cap(), spec.pool_decay)
            for name, spec in manifest.enabled().items()
            if spec.pool
        },
        limits=Limits(
            max_sessions=settings.limits.max_sessions,
            per_resource={n: s.max_sessions for n, s in manifest.enabled().items() if s.max_sessions},
            per_principal=settings.limits.per_principal,
            per_worker=settings.limits.per_worker,
        ),
    )


def executor_from_manifest(manifest: Manifest, *, ray_address: str | None = None) -> Engine:
    """The manifest's executor: the local engine, or (`server.executor = "ray"`) a Ray front end.

    Ray is imported only for the ray executor: the local default never loads it.

    Raises:
        ConfigurationError: a backend is wrong, or executor 'ray' has no cluster address.
    """
    if manifest.server.executor == "local":
        return engine_from_manifest(manifest)
    if not (ray_address or manifest.server.ray_address):
        raise ConfigurationError("executor 'ray' needs the cluster's address: --ray-address or server.ray_address")
    from cluster.executor import RayExecutor  # the only import of the ray executor (and of ray)

    # The front end implements the part of Engine's surface the server uses (call, disconnect,
    # catalog, backends, session_ttl, shutdown, async context manager).
    return cast(Engine, RayExecutor(manifest, address=ray_address))
