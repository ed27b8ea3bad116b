"""Declarative profiles: which backends are on, their classes and default configs, server settings.

`load_manifest(path)` reads JSON or TOML, expands `${VAR}` / `${VAR:-default}`, and
validates; `build_backends(manifest)` imports and instantiates the enabled backends.
Every mistake is refused with a `ConfigurationError` naming the field.
"""

from manifests.loader import DEFAULT_MANIFEST, build_backends, load_manifest
from manifests.schema import Manifest, ResourceSpec, ServerSettings

__all__ = ["DEFAULT_MANIFEST", "Manifest", "ResourceSpec", "ServerSettings", "build_backends", "load_manifest"]
