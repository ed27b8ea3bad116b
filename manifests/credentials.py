"""What a bearer token and a principal name must look like (checked in manifests and at start).

Kept here, below the MCP edge, so reading a manifest never imports the server.
"""

from __future__ import annotations

import re

MIN_TOKEN_LENGTH = 32
TOKEN_PATTERN = re.compile(r"^[\x21-\x7e]+$")
PRINCIPAL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
GENERATE_HINT = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def token_problem(token: str) -> str | None:
    """Why `token` is unacceptable (a message without the token), or None."""
    if len(token) < MIN_TOKEN_LENGTH:
        return f"a token must be at least {MIN_TOKEN_LENGTH} characters ({GENERATE_HINT})"
    if not TOKEN_PATTERN.match(token):
        return "a token must be printable ASCII without spaces"
    return None


def principal_problem(name: str) -> str | None:
    """Why `name` is not a usable principal name, or None."""
    if not PRINCIPAL_PATTERN.match(name):
        return (
            f"principal name {name!r} must be 1-64 characters: letters, digits and _ . @ -, "
            "starting with a letter or digit"
        )
    return None
