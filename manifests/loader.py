"""Read, expand, validate and instantiate a manifest."""

from __future__ import annotations

import importlib
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from backends.base import Backend, Runtime
from backends.policy import Policy, split_policy_request
from manifests.schema import Manifest
from session.errors import ConfigurationError

DEFAULT_MANIFEST = Path(__file__).with_name("default.toml")

BUILTIN_BACKENDS: dict[str, str] = {
    "bash": "backends.bash:BashBackend",
    "vm": "backends.vm:VMBackend",
    "browser": "backends.browser:BrowserBackend",
}

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def load_manifest(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> Manifest:
    """Load and validate a manifest file (default: the packaged `default.toml`).

    Raises:
        ConfigurationError: the file is missing, unparsable, or a field is wrong.
    """
    source = Path(path) if path is not None else DEFAULT_MANIFEST
    try:
        text = source.read_text()
    except OSError as exc:
        raise ConfigurationError(f"cannot read manifest {source}: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text) if source.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        kind = "TOML" if source.suffix == ".toml" else "JSON"
        raise ConfigurationError(f"manifest {source} is not valid {kind}: {exc}") from None
    return parse_manifest(raw, str(source), environ)


def parse_manifest(raw: Any, origin: str = "manifest", environ: dict[str, str] | None = None) -> Manifest:
    expanded = _expand(raw, os.environ if environ is None else environ, ())
    try:
        return Manifest.model_validate(expanded)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        raise ConfigurationError(f"{origin}: {problems}") from None


def _expand(value: Any, environ: os._Environ[str] | dict[str, str], where: tuple[str, ...]) -> Any:
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in environ and (environ[name] or default is None):
                return environ[name]
            if default is not None:
                return default
            field = ".".join(where) or "(root)"
            raise ConfigurationError(
                f"{field}: environment variable {name} is not set (write ${{{name}:-default}} to give a default)"
            )

        return _VAR.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand(v, environ, (*where, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, environ, (*where, str(i))) for i, v in enumerate(value)]
    return value


def import_backend_class(path: str, field: str) -> type[Backend[Any, Any]]:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigurationError(f"{field}: {path!r} is not an import path like 'my_pkg.backends.MineBackend'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"{field}: cannot import module {module_name!r}: {exc}") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigurationError(f"{field}: {path!r} is not a Backend subclass")
    return cls


def build_backends(manifest: Manifest, runtime: Runtime | None = None) -> dict[str, Backend[Any, Any]]:
    """Instantiate every enabled backend with its settings, default config and policy.

    Policy keys written in a resource's `config` by the first contract (`isolation`,
    `network`) are the operator's, so they move to its policy.

    Raises:
        ConfigurationError: naming the field at fault.
    """
    backends: dict[str, Backend[Any, Any]] = {}
    for name, spec in manifest.enabled().items():
        field = f"resources.{name}.backend_class"
        path = spec.backend_class or BUILTIN_BACKENDS.get(name)
        if path is None:
            raise ConfigurationError(
                f"{field}: {name!r} is not a built-in backend ({', '.join(BUILTIN_BACKENDS)}); "
                "give the import path of its class"
            )
        cls = import_backend_class(path, field)
        defaults, legacy_policy = split_policy_request(spec.config)
        policy = _policy(name, cls.default_policy, {**legacy_policy, **(spec.policy or {})})
        try:
            backend = cls(name, settings=spec.settings, defaults=defaults, policy=policy, runtime=runtime)
        except ValidationError as exc:
            raise ConfigurationError(_problems(exc, f"resources.{name}.settings")) from None
        if policy.isolation not in backend.isolation_tiers:
            raise ConfigurationError(
                f"resources.{name}.policy.isolation: {policy.isolation!r} is not available for {name!r} "
                f"(it supports {', '.join(sorted(backend.isolation_tiers))})"
            )
        try:
            backend.Config.model_validate(backend.defaults)
        except ValidationError as exc:
            raise ConfigurationError(_problems(exc, f"resources.{name}.config")) from None
        backends[name] = backend
    if not backends:
        raise ConfigurationError("resources: no backend is enabled")
    return backends


def _policy(name: str, default: Policy, overrides: dict[str, Any]) -> Policy:
    merged = default.model_dump()
    for key, value in overrides.items():
        if key == "limits" and isinstance(value, dict):
            merged["limits"] = {**merged["limits"], **value}
        else:
            merged[key] = value
    try:
        return Policy.model_validate(merged)
    except ValidationError as exc:
        raise ConfigurationError(_problems(exc, f"resources.{name}.policy")) from None


def _problems(exc: ValidationError, where: str) -> str:
    return "; ".join(
        f"{where}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
    )
