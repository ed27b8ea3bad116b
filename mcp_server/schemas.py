"""Tool schemas as every client accepts them (placeholder until the portable rewrite lands)."""

from __future__ import annotations

from typing import Any


def portable_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as listed; see the portable rewrite (OpenAI, VS Code, Gemini)."""
    return schema
