"""Where bearer tokens come from (environment, manifest, generated) and the per-port token file.

Shared by the server (which resolves and writes) and `Sandbox` (which reads). A token is
never logged, never put in an error message and never part of a path; only the token
file's path is logged.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from manifests.credentials import token_problem
from session.errors import ConfigurationError

TOKEN_ENV = "AGENTFLOW_SANDBOX_TOKEN"
DEFAULT_PRINCIPAL = "default"
# Visible ASCII only: a token travels in an HTTP header and must survive shells and JSON.
STATE_DIR_NAME = "agentflow-sandbox"


class TokenSource(StrEnum):
    ENVIRONMENT = "environment"
    MANIFEST = "manifest"
    GENERATED = "generated"


@dataclass(frozen=True)
class Credentials:
    """The accepted tokens, by principal name, and where they came from."""

    tokens: Mapping[str, str]
    source: TokenSource

    def __repr__(self) -> str:  # never print the tokens
        return f"Credentials(principals={sorted(self.tokens)}, source={self.source.value})"






def resolve_credentials(manifest_tokens: Mapping[str, str], environ: Mapping[str, str] | None = None) -> Credentials:
    """The environment variable, else the manifest's `server.tokens`, else a new random token.

    Raises:
        ConfigurationError: the variable is set but not an acceptable token.
    """
    env = os.environ if environ is None else environ
    from_env = env.get(TOKEN_ENV, "")
    if from_env:
        problem = token_problem(from_env)
        if problem:
            raise ConfigurationError(f"{TOKEN_ENV}: {problem}")
        return Credentials({DEFAULT_PRINCIPAL: from_env}, TokenSource.ENVIRONMENT)
    if manifest_tokens:
        return Credentials(dict(manifest_tokens), TokenSource.MANIFEST)
    return Credentials({DEFAULT_PRINCIPAL: secrets.token_urlsafe(32)}, TokenSource.GENERATED)


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$XDG_STATE_HOME/agentflow-sandbox`, else `~/.local/state/agentflow-sandbox`."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "state"
    return root / STATE_DIR_NAME


def token_file(port: int, environ: Mapping[str, str] | None = None) -> Path:
    """The token file of the server listening on `port` (one per port, so servers never clash)."""
    return state_dir(environ) / f"token-{port}"


def write_token_file(port: int, token: str, environ: Mapping[str, str] | None = None) -> Path:
    """Write `token` for `port` with mode 0600 in a 0700 directory, atomically; return the path."""
    path = token_file(port, environ)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return path


def read_token_file(port: int, environ: Mapping[str, str] | None = None) -> str | None:
    """The token in `port`'s token file, or None when there is none (or it is unreadable)."""
    try:
        token = token_file(port, environ).read_text().strip()
    except OSError:
        return None
    return token or None


def remove_token_file(port: int, token: str, environ: Mapping[str, str] | None = None) -> None:
    """Delete `port`'s token file if it still holds `token` (a later server may have replaced it)."""
    if read_token_file(port, environ) == token:
        with contextlib.suppress(OSError):
            token_file(port, environ).unlink()
