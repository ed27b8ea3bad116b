"""Run tool schemas through a framework's strict conversion, in that framework's virtualenv.

Reads {"framework": name, "schemas": {tool name: input schema}} as JSON on stdin and prints,
per tool, whether the strict conversion accepted it, its error, and the converted schema:

- `openai-agents`: `agents.strict_schema.ensure_strict_json_schema`, called the way
  `MCPUtil.to_function_tool` calls it for MCP tools (open objects rejected); a tool it
  rejects is served non-strict.
- `langchain`: `convert_to_openai_tool(..., strict=True)`, which never refuses but closes every
  object, so a free-form map becomes `{}`.

Usage: python strict_probe.py < request.json
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


if __name__ == "__main__":
    request = json.load(sys.stdin)
    convert = {"openai-agents": openai_agents, "langchain": langchain}[request["framework"]]
    sys.stdout.write(json.dumps(convert(request["schemas"])) + "\n")
