"""Run tool schemas through a framework's strict conversion, in that framework's virtualenv.

Reads {"framework": name, "schemas": {tool name: input schema}} as JSON on stdin and prints,
per tool, whether the strict conversion accepted it, its error, and the converted schema:

- `openai-agents`: `agents.strict_schema.ensure_strict_json_schema`, called the way
  `MCPUtil.to_function_tool` calls it for MCP tools (open objects rejected); a tool it
  rejects is served non-strict.
- `langchain`: `convert_to_openai_tool(..., strict=True)`, which never refuses but closes every
  object, so a free-form map becomes `{}`.
- `gemini`: google-genai's `Schema.from_json_schema(..., api_option="GEMINI_API")`, the
  conversion into Gemini's schema subset (it refuses keywords outside it).

Usage: python strict_probe.py < request.json   (framework: openai-agents | langchain | gemini)
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Any


def openai_agents(schemas: dict[str, Any]) -> dict[str, Any]:
    from agents.strict_schema import ensure_strict_json_schema

    out: dict[str, Any] = {}
    for name, schema in schemas.items():
        try:
            converted = ensure_strict_json_schema(copy.deepcopy(schema), _reject_open_objects=True)
            out[name] = {"strict": True, "error": None, "schema": converted}
        except Exception as exc:
            out[name] = {"strict": False, "error": f"{type(exc).__name__}: {exc}", "schema": None}
    return out


def langchain(schemas: dict[str, Any]) -> dict[str, Any]:
    from langchain_core.utils.function_calling import convert_to_openai_tool

    out: dict[str, Any] = {}
    for name, schema in schemas.items():
        tool = {"name": name, "description": name, "parameters": copy.deepcopy(schema)}
        try:
            converted = convert_to_openai_tool(tool, strict=True)["function"]["parameters"]
            out[name] = {"strict": True, "error": None, "schema": converted}
        except Exception as exc:
            out[name] = {"strict": False, "error": f"{type(exc).__name__}: {exc}", "schema": None}
    return out


def gemini(schemas: dict[str, Any]) -> dict[str, Any]:
    from google.genai import types

    out: dict[str, Any] = {}
    for name, schema in schemas.items():
        try:
            converted = types.Schema.from_json_schema(
                json_schema=types.JSONSchema.model_validate(copy.deepcopy(schema)), api_option="GEMINI_API"
            )
            out[name] = {"strict": True, "error": None, "schema": converted.model_dump(mode="json", exclude_none=True)}
        except Exception as exc:
            out[name] = {"strict": False, "error": f"{type(exc).__name__}: {exc}"[:500], "schema": None}
    return out


if __name__ == "__main__":
    request = json.load(sys.stdin)
    convert = {"openai-agents": openai_agents, "langchain": langchain, "gemini": gemini}[request["framework"]]
    sys.stdout.write(json.dumps(convert(request["schemas"])) + "\n")
