"""Every tool schema of the default manifest under the strict conversions agent frameworks apply.

The schemas are the ones the server lists: `portable_schema` (mcp_server/schemas.py) applied to
every tool, whose `create_session` / `reinitialize` configs are a union of the resources'
config schemas. Each one must be a valid Draft 2020-12 schema with `items` on every array,
before and after conversion. Then:

- openai-agents (`ensure_strict_json_schema`, as `MCPUtil.to_function_tool` calls it) must
  accept every tool except those holding a free-form map (bash `env`, browser
  `extra_headers`, ...), the one accepted reason to fall back to non-strict;
- LangChain (`convert_to_openai_tool(strict=True)`) must empty nothing but free-form maps; in
  particular the session configs keep every resource's fields instead of collapsing to `{}`;
- google-genai's conversion into Gemini's schema subset must accept every tool (it refuses
  `prefixItems` and `exclusiveMinimum`, which pydantic emits).

`NON_STRICT_TOOLS` is the list the README gives; this test keeps the two in step.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator, Draft202012Validator

from manifests import load_manifest
from mcp_server.cli import cli_logic
from mcp_server.factory import engine_from_manifest
from mcp_server.schemas import arrays_without_items, free_form_maps, portable_schema, untyped_schemas
from tests.frameworks.helpers import run_probe

pytestmark = pytest.mark.slow

NON_STRICT_TOOLS = {"create_session", "reinitialize"}
SESSION_CONFIG_TOOLS = ("create_session", "reinitialize")


@pytest.fixture(scope="module")
def raw_catalog() -> dict[str, dict[str, Any]]:
    """name -> the raw pydantic input schema of every tool of the default manifest."""
    engine = engine_from_manifest(load_manifest())
    return {spec.qualified_name: spec.input_schema() for spec in engine.catalog.values()}


@pytest.fixture(scope="module")
def catalog() -> dict[str, dict[str, Any]]:
    """name -> inputSchema as the server lists them (`agentflow-sandbox tools --json`, default manifest)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_logic(["tools", "--json"]) == 0
    return {tool["name"]: tool["inputSchema"] for tool in json.loads(out.getvalue())}


@pytest.fixture(scope="module")
def openai_agents_strict(framework_venvs: dict[str, Path], catalog: dict[str, Any]) -> dict[str, Any]:
    return run_probe(framework_venvs["openai-agents"], "strict_probe.py", "", "", stdin=_args("openai-agents", catalog))


@pytest.fixture(scope="module")
def langchain_strict(framework_venvs: dict[str, Path], catalog: dict[str, Any]) -> dict[str, Any]:
    return run_probe(framework_venvs["langchain"], "strict_probe.py", "", "", stdin=_args("langchain", catalog))


@pytest.fixture(scope="module")
def gemini_schemas(framework_venvs: dict[str, Path], catalog: dict[str, Any]) -> dict[str, Any]:
    return run_probe(framework_venvs["gemini"], "strict_probe.py", "", "", stdin=_args("gemini", catalog))


def _args(framework: str, catalog: dict[str, Any]) -> bytes:
    return json.dumps({"framework": framework, "schemas": catalog}).encode()


def test_the_raw_catalog_breaks_the_array_rule(raw_catalog):
    """Why portable_schema exists: pydantic tuples (vm_drag) have no `items`."""
    offenders = {name for name, schema in raw_catalog.items() if arrays_without_items(schema)}
    assert "vm_drag" in offenders


def test_the_listing_serves_the_portable_schemas(catalog, raw_catalog):
    assert set(catalog) == set(raw_catalog)
    for name, schema in catalog.items():
        assert schema == portable_schema(schema), f"{name} is listed without portable_schema"


def test_every_tool_that_takes_a_handle_declares_it(catalog):
    without_handle = {"create_session", "list_sessions", "warmup", "get_status"}
    for name, schema in catalog.items():
        if name not in without_handle:
            handle = schema["properties"].get("session_id")
            assert handle is not None, f"{name} does not declare session_id"
            assert handle.get("type") == "string" or {"type": "string"} in handle.get("anyOf", []), (name, handle)
            assert "session_id" not in schema.get("required", []), name


def test_every_listed_schema_is_valid_with_items_on_every_array(catalog):
    for name, schema in catalog.items():
        Draft202012Validator.check_schema(schema)
        Draft7Validator.check_schema(schema)  # what VS Code's JSON language service speaks
        assert arrays_without_items(schema) == [], name
        assert untyped_schemas(schema) == [], f"{name}: OpenAI strict refuses untyped {untyped_schemas(schema)}"
        assert schema["type"] == "object", name


def test_openai_agents_strict_conversion_falls_back_only_for_free_form_maps(catalog, openai_agents_strict):
    assert set(openai_agents_strict) == set(catalog)
    non_strict = {name for name, outcome in openai_agents_strict.items() if not outcome["strict"]}
    for name in non_strict:
        maps = free_form_maps(catalog[name])
        assert maps, f"{name} falls back to non-strict without a free-form map: {openai_agents_strict[name]['error']}"
        assert (
            "additionalProperties" in openai_agents_strict[name]["error"]
            or "undeclared properties" in (openai_agents_strict[name]["error"])
        ), openai_agents_strict[name]["error"]
    with_maps = {name for name, schema in catalog.items() if free_form_maps(schema)}
    assert non_strict == with_maps, "every tool with a free-form map falls back, and no other"
    assert non_strict == NON_STRICT_TOOLS, "update NON_STRICT_TOOLS and the README's list"


def test_the_readme_lists_the_non_strict_tools():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Strict tool schemas", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert {row.split("`")[1] for row in rows} == NON_STRICT_TOOLS


def test_openai_agents_strict_schemas_stay_valid_and_keep_items(openai_agents_strict):
    for name, outcome in openai_agents_strict.items():
        if outcome["strict"]:
            Draft202012Validator.check_schema(outcome["schema"])
            assert arrays_without_items(outcome["schema"]) == [], name
            assert _emptied(outcome["schema"]) == [], name


def test_langchain_strict_conversion_empties_only_free_form_maps(catalog, langchain_strict):
    for name, schema in catalog.items():
        outcome = langchain_strict[name]
        assert outcome["strict"], outcome["error"]
        converted = outcome["schema"]
        Draft202012Validator.check_schema(converted)
        assert arrays_without_items(converted) == [], name
        emptied = set(_emptied(converted))
        assert emptied <= set(free_form_maps(schema)), f"{name}: {sorted(emptied - set(free_form_maps(schema)))}"


def test_session_configs_keep_every_resource_s_fields_under_strict_conversion(langchain_strict):
    for name in SESSION_CONFIG_TOOLS:
        config = langchain_strict[name]["schema"]["properties"]["config"]
        objects = [branch for branch in config["anyOf"] if branch.get("type") == "object"]
        fields = [set(branch["properties"]) for branch in objects]
        assert {"cwd", "timeout", "custom_name"} in [f & {"cwd", "timeout", "custom_name"} for f in fields], name
        assert any("screen_size" in f for f in fields), name
        assert any("viewport" in f for f in fields), name


def test_gemini_accepts_every_portable_schema(catalog, gemini_schemas, framework_venvs, raw_catalog):
    refused = {name: outcome["error"] for name, outcome in gemini_schemas.items() if not outcome["strict"]}
    assert refused == {}
    assert set(gemini_schemas) == set(catalog)
    drag = gemini_schemas["vm_drag"]["schema"]["properties"]["from"]
    assert drag["items"]["type"] == "INTEGER"
    assert (int(drag["min_items"]), int(drag["max_items"])) == (2, 2)
    # The same conversion refuses pydantic's raw output, so this checks something.
    raw = run_probe(framework_venvs["gemini"], "strict_probe.py", "", "", stdin=_args("gemini", raw_catalog))
    assert not raw["vm_drag"]["strict"]


def _emptied(schema: Any, path: str = "#") -> list[str]:
    """Pointers of closed objects with no properties below the root: what a model cannot fill."""
    found: list[str] = []
    if isinstance(schema, dict):
        if (
            path != "#"
            and schema.get("type") == "object"
            and not schema.get("properties")
            and schema.get("additionalProperties") is False
        ):
            found.append(path)
        for key, value in schema.items():
            if key == "properties" and isinstance(value, dict):
                for prop, sub in value.items():
                    found += _emptied(sub, f"{path}/properties/{prop}")
            elif key in ("anyOf", "oneOf", "allOf") and isinstance(value, list):
                for index, sub in enumerate(value):
                    found += _emptied(sub, f"{path}/{key}/{index}")
            elif key in ("items", "additionalProperties") and isinstance(value, dict):
                found += _emptied(value, f"{path}/{key}")
    return found
