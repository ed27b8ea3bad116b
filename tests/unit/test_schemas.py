"""Portable tool schemas: what OpenAI, VS Code and Gemini accept, over the real tool catalog."""

from __future__ import annotations

import copy
import json
from typing import Any, Literal

import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel, Field

from manifests import load_manifest
from mcp_server.factory import engine_from_manifest
from mcp_server.schemas import (
    arrays_without_items,
    config_map_schema,
    config_union_schema,
    portable_schema,
    untyped_schemas,
    with_session_configs,
)
from session.engine import Engine

# Gemini's function-declaration schema (an OpenAPI 3.0 subset) knows these keywords; the
# portable schemas use nothing else. `additionalProperties` is kept on purpose (a closed
# object, or a free-form map such as bash `env`); Gemini clients that predate it drop it.
GEMINI_KEYWORDS = {
    "type", "description", "enum", "default", "properties", "required", "items", "minItems", "maxItems",
    "minimum", "maximum", "minLength", "maxLength", "pattern", "anyOf", "format", "title", "nullable",
    "minProperties", "maxProperties", "propertyOrdering", "additionalProperties",
}  # fmt: skip
CUSTOM_NAME = {"custom_name": {"type": "string", "description": "A label for the session."}}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return engine_from_manifest(load_manifest())


@pytest.fixture(scope="module")
def catalog(engine: Engine) -> dict[str, dict[str, Any]]:
    """name -> the raw pydantic input schema of every tool of the default manifest (before listing)."""
    return {spec.qualified_name: spec.input_schema() for spec in engine.catalog.values()}


@pytest.fixture(scope="module")
def configs(engine: Engine) -> dict[str, dict[str, Any]]:
    return {name: backend.Config.model_json_schema() for name, backend in engine.backends.items()}


def keywords(schema: Any) -> set[str]:
    """Every schema keyword used in `schema` (property names are not keywords)."""
    found: set[str] = set()
    if isinstance(schema, dict):
        for key, value in schema.items():
            found.add(key)
            if key == "properties":
                for sub in value.values():
                    found |= keywords(sub)
            elif isinstance(value, dict):
                found |= keywords(value)
            elif isinstance(value, list):
                for sub in value:
                    found |= keywords(sub)
    return found


def test_the_catalog_has_the_known_offenders(catalog):
    # Guards the tests below: if pydantic stops emitting these, they test nothing.
    assert arrays_without_items(catalog["vm_drag"]) == ["#/properties/from", "#/properties/to"]
    assert "exclusiveMinimum" in json.dumps(catalog["bash_run"])


def test_every_tool_schema_becomes_a_valid_schema_with_items_on_every_array(catalog):
    assert len(catalog) >= 30
    for name, schema in catalog.items():
        portable = portable_schema(schema)
        Draft202012Validator.check_schema(portable)
        assert arrays_without_items(portable) == [], name
        assert untyped_schemas(portable) == [], f"{name}: OpenAI strict refuses untyped {untyped_schemas(portable)}"
        assert portable["type"] == "object", name
        assert "properties" in portable, name


def test_every_tool_schema_stays_inside_gemini_s_subset(catalog):
    for name, schema in catalog.items():
        extra = keywords(portable_schema(schema)) - GEMINI_KEYWORDS
        assert not extra, f"{name} uses {sorted(extra)}"


def test_vm_drag_points_keep_their_length_and_type(catalog):
    portable = portable_schema(catalog["vm_drag"])
    point = portable["properties"]["from"]
    assert point["items"] == {"type": "integer"}
    assert (point["minItems"], point["maxItems"]) == (2, 2)
    assert "prefixItems" not in point
    validator = Draft202012Validator(portable)
    assert validator.is_valid({"from": [1, 2], "to": [3, 4]})
    assert not validator.is_valid({"from": [1], "to": [3, 4]})
    assert not validator.is_valid({"from": [1, 2, 3], "to": [3, 4]})
    assert not validator.is_valid({"from": ["a", 2], "to": [3, 4]})


def test_descriptions_defaults_enums_and_bounds_survive(catalog):
    portable = portable_schema(catalog["vm_scroll"])
    amount = portable["properties"]["amount"]
    assert amount["default"] == 3
    assert (amount["minimum"], amount["maximum"]) == (1, 50)
    assert "wheel notches" in amount["description"]
    assert portable["properties"]["direction"]["enum"] == ["up", "down", "left", "right"]
    assert portable["additionalProperties"] is False
    assert "title" not in keywords(portable)
    assert portable_schema(catalog["vm_scroll"], keep_titles=True)["title"] == "ScrollArgs"


def test_an_exclusive_bound_becomes_inclusive_and_the_description_says_so(catalog):
    timeout = portable_schema(catalog["bash_run"])["properties"]["timeout"]
    number = next(branch for branch in timeout["anyOf"] if branch.get("type") == "number")
    assert number["minimum"] == 0
    assert "greater than 0" in number["description"]
    assert {"type": "null"} in timeout["anyOf"]  # optional: strict clients send null for "default"


def test_the_same_instances_stay_valid(catalog):
    samples = {
        "bash_run": [{"command": "ls"}, {"command": "ls", "timeout": 5}, {"command": "ls", "timeout": None}],
        "vm_hotkey": [{"keys": ["ctrl", "l"]}, {"keys": "ctrl+l"}],
        "vm_click": [{}, {"x": 1, "y": 2, "button": "right", "hold_keys": ["shift"]}],
        "browser_click": [{"ref": "e1"}, {"x": 1.5, "y": 2, "modifiers": ["Shift"]}],
    }
    for name, instances in samples.items():
        before, after = Draft202012Validator(catalog[name]), Draft202012Validator(portable_schema(catalog[name]))
        for instance in instances:
            assert before.is_valid(instance), (name, instance)
            assert after.is_valid(instance), (name, instance)
        assert not after.is_valid({"no_such_argument": 1}), name


def test_the_input_is_not_modified(catalog):
    original = copy.deepcopy(catalog)
    for schema in catalog.values():
        portable_schema(schema)
    assert catalog == original


class _Point(BaseModel):
    """A point."""

    x: int = Field(description="Horizontal.")
    y: int


class _Node(BaseModel):
    name: str
    children: list[_Node] = Field(default_factory=list)


class _Args(BaseModel):
    start: _Point = Field(description="Where it starts.")
    path: list[_Point]
    kind: Literal["line"] = "line"
    tree: _Node | None = None
    title: str = Field(default="", description="A property named like a keyword.")


def test_refs_are_inlined_const_becomes_enum_and_recursion_terminates():
    raw = _Args.model_json_schema()
    assert "$defs" in raw
    portable = portable_schema(raw)
    text = json.dumps(portable)
    assert "$ref" not in text
    assert "$defs" not in text
    start = portable["properties"]["start"]
    assert start["description"] == "Where it starts."  # the field's description wins over the model's
    assert start["properties"]["x"] == {"description": "Horizontal.", "type": "integer"}
    assert portable["properties"]["path"]["items"]["required"] == ["x", "y"]
    assert portable["properties"]["kind"]["enum"] == ["line"]
    assert "title" in portable["properties"]  # a property called "title" is not the keyword
    node = next(b for b in portable["properties"]["tree"]["anyOf"] if b.get("type") == "object")
    recursive = node["properties"]["children"]["items"]
    assert recursive["type"] == "object"
    Draft202012Validator.check_schema(portable)
    assert Draft202012Validator(portable).is_valid(
        {"start": {"x": 1, "y": 2}, "path": [], "tree": {"name": "a", "children": [{"name": "b"}]}}
    )


def test_an_untyped_enum_gets_the_type_of_its_values_and_untyped_nodes_are_reported():
    raw = {
        "type": "object",
        "properties": {
            "size": {"const": 3},
            "mode": {"enum": ["a", "b"]},
            "ratio": {"enum": [1, 1.5]},
            "mixed": {"enum": ["a", 1]},
            "anything": {"description": "no type at all"},
        },
    }
    portable = portable_schema(raw)
    props = portable["properties"]
    assert props["size"] == {"enum": [3], "type": "integer"}
    assert props["mode"]["type"] == "string"
    assert props["ratio"]["type"] == "number"
    assert "type" not in props["mixed"]
    assert untyped_schemas(portable) == ["#/properties/mixed", "#/properties/anything"]


def test_definitions_pasted_into_a_union_are_found_and_a_dangling_ref_is_reported():
    pasted = _Args.model_json_schema()  # carries its own $defs, as a config schema in a union does
    raw = {
        "type": "object",
        "properties": {"config": {"anyOf": [pasted, {"type": "null"}]}, "dangling": {"$ref": "#/$defs/Nope"}},
    }
    portable = portable_schema(raw)
    config = portable["properties"]["config"]["anyOf"][0]
    assert config["properties"]["start"]["properties"]["x"]["type"] == "integer"
    assert "$ref" not in json.dumps(portable)
    assert untyped_schemas(portable) == ["#/properties/dangling"]


def test_one_of_and_single_all_of_are_rewritten():
    raw = {
        "type": "object",
        "properties": {
            "a": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
            "b": {"allOf": [{"$ref": "#/$defs/B"}], "description": "b"},
            "c": {"type": "array"},
        },
        "$defs": {"B": {"type": "string", "enum": ["x"]}},
    }
    portable = portable_schema(raw)
    assert portable["properties"]["a"] == {"anyOf": [{"type": "string"}, {"type": "integer"}]}
    assert portable["properties"]["b"] == {"description": "b", "type": "string", "enum": ["x"]}
    assert portable["properties"]["c"]["items"] == {}


def test_the_config_union_shows_every_resource_s_fields(configs):
    union = config_union_schema(configs, common_properties=CUSTOM_NAME)
    Draft202012Validator.check_schema(union)
    branches = {b["description"].split("'")[1]: b for b in union["anyOf"] if b.get("type") == "object"}
    assert set(branches) == {"bash", "vm", "browser"}
    assert {"cwd", "env", "timeout", "custom_name"} <= set(branches["bash"]["properties"])
    assert branches["vm"]["properties"]["screen_size"]["items"] == {"type": "integer"}
    assert branches["vm"]["properties"]["provider"]["enum"] == ["xvfb"]
    assert union["default"] is None
    validator = Draft202012Validator(union)
    for instance in ({"cwd": "/tmp", "custom_name": "shell"}, {"screen_size": [800, 600]}, {"viewport": [640, 480]}):
        assert validator.is_valid(instance), instance
    assert validator.is_valid(None)
    assert not validator.is_valid({"no_such_field": 1})
    assert arrays_without_items(union) == []
    assert not keywords(union) - GEMINI_KEYWORDS


def test_the_config_map_is_closed_to_unknown_resources(configs):
    mapping = config_map_schema(configs)
    validator = Draft202012Validator(mapping)
    assert validator.is_valid({"bash": {"cwd": "/tmp"}, "vm": None})
    assert not validator.is_valid({"nosuch": {}})
    assert not validator.is_valid({"bash": {"nope": 1}})


def test_create_session_and_reinitialize_get_typed_configs(catalog, configs):
    for name in ("create_session", "reinitialize"):
        typed = with_session_configs(catalog[name], configs, common_properties=CUSTOM_NAME)
        Draft202012Validator.check_schema(typed)
        config = typed["properties"]["config"]
        objects = [branch for branch in config["anyOf"] if branch.get("type") == "object"]
        assert len(objects) == 3, name
        assert all(branch["properties"] for branch in objects), name  # no open `{}` left to collapse
        validator = Draft202012Validator(typed)
        assert validator.is_valid({"resource": "bash", "config": {"cwd": "/tmp"}}), name
        assert not validator.is_valid({"resource": "bash", "config": {"no_such_field": 1}}), name
    create = Draft202012Validator(with_session_configs(catalog["create_session"], configs, typed_resource_map=True))
    assert create.is_valid({"resource": {"bash": {"cwd": "/tmp"}, "vm": None}})
    assert create.is_valid({"resource": ["bash", "vm"]})
    assert not create.is_valid({"resource": {"nosuch": None}})
    untyped = Draft202012Validator(with_session_configs(catalog["create_session"], configs))
    assert untyped.is_valid({"resource": {"bash": {"cwd": "/tmp"}, "vm": None}})
