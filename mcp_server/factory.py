"""Manifest -> engine: the one place a manifest's settings reach the session engine."""

from __future__ import annotations

from manifests import build_backends
from manifests.schema import Manifest
from session.budget import Limits
from session.engine import Engine


def engine_from_manifest(manifest: Manifest) -> Engine:
    """An engine with the manifest's enabled backends, TTL and limits.

    Raises:
        ConfigurationError: a backend class or config in the manifest is wrong.
    """
    return Engine(
        build_backends(manifest),
        session_ttl=manifest.server.session_ttl,
        limits=Limits(
            max_sessions=manifest.server.max_sessions,
            per_resource={n: s.max_sessions for n, s in manifest.enabled().items() if s.max_sessions},
        ),
    )
