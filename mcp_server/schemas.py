"""Tool input schemas that every common MCP client accepts.

pydantic's JSON Schema is valid Draft 2020-12, but clients apply narrower rules:

- OpenAI function schemas need `items` on every array; pydantic gives a `tuple[int, int]`
  only `prefixItems`, and VS Code rejects a whole server over one such schema.
- Gemini accepts an OpenAPI-like subset: no `$ref`/`$defs`, no `const`, no `prefixItems`,
  no `exclusiveMinimum`, no `oneOf`/`allOf`.
- Strict conversions (openai-agents `ensure_strict_json_schema`, LangChain
  `convert_to_openai_tool(strict=True)`) make every property required and every object
  closed, so an open object (`dict[str, Any]`) either becomes `{}`, which a model cannot
  fill, or makes the whole tool fall back to a non-strict schema.

`portable_schema` rewrites one schema into that common subset without losing what a model
needs (descriptions, defaults, enums, bounds). `config_union_schema`, `config_map_schema`
and `with_session_configs` replace the open `config` objects of `create_session` and
`reinitialize` by the resources' own config schemas, so a model sees the fields.
`arrays_without_items`, `untyped_schemas` and `free_form_maps` find what a client would
refuse or a strict conversion cannot express (the tests use them over the whole catalog).
The server still validates every call with the original pydantic model, so a schema that
advertises a little less than pydantic checks (an exclusive bound shown as inclusive) only
moves an error from the client to the server's 1002 answer.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from typing import Any

Schema = dict[str, Any]

# Keywords no client needs and some reject (`$schema`, `$id`: Gemini; `discriminator`: OpenAPI only).
_DROPPED = frozenset({"$schema", "$id", "$comment", "$defs", "definitions", "discriminator", "examples"})
# Keywords whose value is one subschema / a list of subschemas / a name -> subschema map.
_SUBSCHEMA = ("items", "not", "contains", "propertyNames", "if", "then", "else")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "dependentSchemas")
# The only string format every target understands; others ("path", "uri", ...) are pydantic hints.
_KEPT_FORMATS = frozenset({"date-time"})
_NULL: Schema = {"type": "null"}


def portable_schema(schema: Mapping[str, Any], *, keep_titles: bool = False) -> Schema:
    """Rewrite a pydantic JSON Schema into the subset OpenAI, VS Code and Gemini all accept.

    What changes (the input is not modified):

    - every `$ref` is inlined (definitions are found at any depth) and `$defs` dropped; a
      recursive reference, which no target can express, becomes an object described as
      recursive, and an unresolvable one an untyped schema that `untyped_schemas` reports;
    - `prefixItems` (a pydantic tuple) becomes `items` (the common item schema, or an
      `anyOf` of the distinct ones) with `minItems`/`maxItems` fixing the length, and an
      array without `items` gets `items: {}`;
    - `const: v` becomes `enum: [v]`, and an `enum` without `type` gets the type of its
      values (OpenAI's strict mode refuses any schema without `type`); `oneOf` becomes
      `anyOf`; a one-member `allOf` (pydantic's way to describe a `$ref`) is merged into
      its parent;
    - `exclusiveMinimum`/`exclusiveMaximum` become `minimum`/`maximum`, and the
      description says the bound is exclusive;
    - nested `anyOf`s are flattened; `anyOf: [X, {"type": "null"}]` is kept as such,
      because under strict conversion every property is required and `null` is then the
      only way a model can leave an optional argument to its default;
    - `title`s are dropped unless `keep_titles` (they repeat the property names), as are
      `$schema`, `$id`, `$comment`, `discriminator`, `examples` and string formats other
      than `date-time`;
    - the root is an object with `properties` (MCP requires `type: object`).

    Kept: `description`, `default`, `enum`, `minimum`/`maximum`, length and item bounds,
    `pattern`, `required`, and `additionalProperties` (`false` documents a closed object;
    a schema or `true` marks a free-form map, the one thing strict conversions cannot
    express, so such tools fall back to non-strict rather than being emptied).
    """
    root = copy.deepcopy(dict(schema))
    out = _Rewriter(_collect_defs(root), keep_titles=keep_titles).rewrite_schema(root)
    if out.get("type") != "object":
        out["type"] = "object"
    out.setdefault("properties", {})
    return out


def config_union_schema(
    configs: Mapping[str, Mapping[str, Any]],
    *,
    common_properties: Mapping[str, Mapping[str, Any]] | None = None,
    nullable: bool = True,
) -> Schema:
    """The schema of `create_session.config` / `reinitialize.config`: any one resource's config.

    `configs` maps each resource type to its session-config JSON Schema (its backend's
    `Config.model_json_schema()`). The result is an `anyOf` of those object schemas, each
    made portable and described "Config for resource 'X'", plus `null` when `nullable`
    (the argument is optional). `common_properties` are added to every branch: the engine
    reads keys such as `custom_name` before validating the rest, and a closed object would
    otherwise forbid them.

    A strict conversion keeps every branch (instead of collapsing an open object to `{}`);
    a branch holding a free-form map (bash `env`) still makes the tool non-strict.
    """
    branches: list[Schema] = []
    for resource, config in sorted(configs.items()):
        branch = portable_schema(config)
        if common_properties:
            branch["properties"] = {
                **branch["properties"],
                **{name: portable_schema_fragment(prop) for name, prop in common_properties.items()},
            }
        summary = branch.pop("description", None)
        branch["description"] = f"Config for resource '{resource}'." + (f" {summary}" if summary else "")
        branches.append(branch)
    if nullable:
        branches.append(dict(_NULL))
    if not branches:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    union: Schema = {"anyOf": branches} if len(branches) > 1 else branches[0]
    names = ", ".join(repr(name) for name in sorted(configs))
    union["description"] = (
        f"Session config of the resource named in `resource` (one of {names}): use that resource's object; "
        "omitted fields take the server's defaults." + (" null (or omitted): all defaults." if nullable else "")
    )
    if nullable:
        union["default"] = None
    return union


def config_map_schema(
    configs: Mapping[str, Mapping[str, Any]],
    *,
    common_properties: Mapping[str, Mapping[str, Any]] | None = None,
) -> Schema:
    """The schema of `create_session.resource` in its mapping form `{resource: config | null}`.

    An object with one optional property per resource type (its config schema or `null`),
    closed to other keys, instead of an open map of open objects: strict conversions keep it
    and a model sees each resource's fields.
    """
    properties: Schema = {}
    for resource, config in sorted(configs.items()):
        branch = portable_schema(config)
        if common_properties:
            branch["properties"] = {
                **branch["properties"],
                **{name: portable_schema_fragment(prop) for name, prop in common_properties.items()},
            }
        branch.pop("description", None)
        properties[resource] = {
            "anyOf": [branch, dict(_NULL)],
            "default": None,
            "description": f"Config of the '{resource}' session to create (null: defaults).",
        }
    return {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
        "description": "Resource type -> its session config (null for defaults), to create several at once.",
    }


def portable_schema_fragment(schema: Mapping[str, Any], *, keep_titles: bool = False) -> Schema:
    """`portable_schema` for a property's schema (no root object forced on it)."""
    root = copy.deepcopy(dict(schema))
    return _Rewriter(_collect_defs(root), keep_titles=keep_titles).rewrite_schema(root)


def _subschemas(schema: Any, path: str = "#", *, with_defs: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every subschema of `schema` with its JSON pointer, depth first, the root first."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key, value in schema.items():
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                yield from _subschemas(sub, f"{path}/{key}/{name}", with_defs=with_defs)
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            for index, sub in enumerate(value):
                yield from _subschemas(sub, f"{path}/{key}/{index}", with_defs=with_defs)
        elif key in (*_SUBSCHEMA, "additionalProperties") and isinstance(value, dict):
            yield from _subschemas(value, f"{path}/{key}", with_defs=with_defs)
        elif with_defs and key in ("$defs", "definitions") and isinstance(value, dict):
            for name, sub in value.items():
                yield from _subschemas(sub, f"{path}/{key}/{name}", with_defs=with_defs)


def arrays_without_items(schema: Any, path: str = "#") -> list[str]:
    """JSON pointers of the array schemas in `schema` that have no `items` (OpenAI refuses them)."""

    def is_array(node: dict[str, Any]) -> bool:
        types = node.get("type")
        return types == "array" or (isinstance(types, list) and "array" in types)

    nodes = _subschemas(schema, path, with_defs=True)
    return [where for where, node in nodes if is_array(node) and "items" not in node]


def free_form_maps(schema: Any, path: str = "#") -> list[str]:
    """JSON pointers of the objects in `schema` that accept undeclared keys (`dict[str, X]`).

    These are what strict conversions cannot express: openai-agents then serves the tool
    non-strict, LangChain's `strict=True` empties them to `{}`.
    """
    return [
        where
        for where, node in _subschemas(schema, path)
        if node.get("additionalProperties") is not None and node.get("additionalProperties") is not False
    ]


def untyped_schemas(schema: Any, path: str = "#") -> list[str]:
    """JSON pointers of subschemas with neither `type` nor `anyOf` (`{}`, a bare description).

    OpenAI's strict mode answers such a schema with 400 "schema must have a 'type' key" and
    refuses the whole request, every tool with it; `portable_schema` cannot invent a type,
    so the model behind the schema must declare one.
    """
    return [where for where, node in _subschemas(schema, path) if "type" not in node and "anyOf" not in node]


def _collect_defs(schema: Any, found: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every `$defs`/`definitions` entry in the document, the outermost first.

    Nested ones count too: a schema assembled from several pydantic models (a union of config
    schemas) carries each model's definitions where that model's schema was pasted in.
    """
    found = {} if found is None else found
    if isinstance(schema, dict):
        for key in ("$defs", "definitions"):
            if isinstance(schema.get(key), dict):
                for name, definition in schema[key].items():
                    found.setdefault(name, definition)
        for value in schema.values():
            _collect_defs(value, found)
    elif isinstance(schema, list):
        for value in schema:
            _collect_defs(value, found)
    return found


def _enum_type(values: Any) -> str | None:
    if not isinstance(values, list) or not values:
        return None
    kinds = set()
    for value in values:
        if isinstance(value, bool):
            kinds.add("boolean")
        elif isinstance(value, int):
            kinds.add("integer")
        elif isinstance(value, float):
            kinds.add("number")
        elif isinstance(value, str):
            kinds.add("string")
        else:
            return None  # null or structured values: leave it to the author
    if kinds == {"integer", "number"}:
        return "number"
    return kinds.pop() if len(kinds) == 1 else None


class _Rewriter:
    def __init__(self, defs: Mapping[str, Any], *, keep_titles: bool) -> None:
        self._defs = defs
        self._keep_titles = keep_titles
        self._resolving: list[str] = []

    def rewrite(self, schema: Any) -> Any:
        # Booleans (`true` = anything) are valid schemas too; they stay as they are.
        return self.rewrite_schema(schema) if isinstance(schema, dict) else schema

    def rewrite_schema(self, schema: Schema) -> Schema:
        schema = self._inline(schema)
        out: Schema = {}
        for key, value in schema.items():
            if key in _DROPPED or (key == "title" and not self._keep_titles):
                continue
            if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
                out[key] = {name: self.rewrite(sub) for name, sub in value.items()}
            elif key in ("anyOf", "oneOf", "allOf") and isinstance(value, list):
                out[key] = [self.rewrite(sub) for sub in value]
            elif key in (*_SUBSCHEMA, "prefixItems", "additionalProperties"):
                out[key] = [self.rewrite(s) for s in value] if isinstance(value, list) else self.rewrite(value)
            else:
                out[key] = value
        self._merge_single_all_of(out)
        if "oneOf" in out:
            out["anyOf"] = [*out.pop("anyOf", []), *out.pop("oneOf")]
        if "anyOf" in out:
            self._flatten_any_of(out)
        if "const" in out:
            out.setdefault("enum", [out["const"]])
            del out["const"]
        if "enum" in out and "type" not in out:
            inferred = _enum_type(out["enum"])
            if inferred is not None:
                out["type"] = inferred
        if "format" in out and out["format"] not in _KEPT_FORMATS:
            del out["format"]
        self._exclusive_bounds(out)
        self._tuple_items(out)
        return out

    def _inline(self, schema: Schema) -> Schema:
        ref = schema.get("$ref")
        if not isinstance(ref, str):
            return schema
        name = ref.rsplit("/", 1)[-1]
        target = self._defs.get(name)
        siblings = {k: v for k, v in schema.items() if k != "$ref"}
        if target is None:
            # Left untyped on purpose, so `untyped_schemas` (and a strict client) reports it.
            return {**siblings, "description": siblings.get("description", f"(unresolved reference {ref})")}
        if name in self._resolving:
            # No target can express recursion: say what it is and accept any object.
            return {"type": "object", **siblings, "description": siblings.get("description", f"(recursive {name})")}
        self._resolving.append(name)
        try:
            # A boolean definition (`true`) constrains nothing: only the siblings remain.
            inlined = self.rewrite_schema(copy.deepcopy(target)) if isinstance(target, dict) else {}
        finally:
            self._resolving.pop()
        # Keywords beside the $ref (a field's description, default) win over the definition's.
        return {**inlined, **siblings}

    @staticmethod
    def _merge_single_all_of(out: Schema) -> None:
        members = out.get("allOf")
        if isinstance(members, list) and len(members) == 1 and isinstance(members[0], dict):
            del out["allOf"]
            for key, value in members[0].items():
                out.setdefault(key, value)

    @staticmethod
    def _flatten_any_of(out: Schema) -> None:
        flat: list[Any] = []
        for member in out["anyOf"]:
            if isinstance(member, dict) and set(member) == {"anyOf"}:
                flat.extend(member["anyOf"])
            else:
                flat.append(member)
        unique: list[Any] = []
        seen: set[str] = set()
        for member in flat:
            key = json.dumps(member, sort_keys=True)
            if key not in seen:
                seen.add(key)
                unique.append(member)
        if len(unique) == 1 and isinstance(unique[0], dict):
            del out["anyOf"]
            for key, value in unique[0].items():
                out.setdefault(key, value)
        else:
            out["anyOf"] = unique

    @staticmethod
    def _exclusive_bounds(out: Schema) -> None:
        notes: list[str] = []
        for exclusive, inclusive, word in (
            ("exclusiveMinimum", "minimum", "greater"),
            ("exclusiveMaximum", "maximum", "less"),
        ):
            bound = out.pop(exclusive, None)
            if isinstance(bound, bool) or bound is None:  # Draft 4 booleans: the inclusive bound says it
                continue
            out[inclusive] = bound
            notes.append(f"{word} than {bound:g}" if isinstance(bound, float) else f"{word} than {bound}")
        if notes:
            description = str(out.get("description", "")).rstrip()
            suffix = f"Must be {' and '.join(notes)}."
            out["description"] = f"{description} {suffix}" if description else suffix

    @staticmethod
    def _tuple_items(out: Schema) -> None:
        prefix = out.pop("prefixItems", None)
        if isinstance(prefix, list) and prefix:
            distinct: list[Any] = []
            for member in prefix:
                if member not in distinct:
                    distinct.append(member)
            tail = out.get("items")
            if tail is None or tail is False:
                out["items"] = distinct[0] if len(distinct) == 1 else {"anyOf": distinct}
                out.setdefault("minItems", len(prefix))
                out.setdefault("maxItems", len(prefix))
            elif tail not in distinct:
                out["items"] = {"anyOf": [*distinct, tail]}
                out.setdefault("minItems", len(prefix))
        types = out.get("type")
        if (types == "array" or (isinstance(types, list) and "array" in types)) and "items" not in out:
            out["items"] = {}


def with_session_configs(
    schema: Mapping[str, Any],
    configs: Mapping[str, Mapping[str, Any]],
    *,
    common_properties: Mapping[str, Mapping[str, Any]] | None = None,
    typed_resource_map: bool = False,
) -> Schema:
    """A portable `create_session` / `reinitialize` schema with typed configs in place of open objects.

    `schema` is the meta-tool's input schema (raw or portable). Its `config` property becomes
    `config_union_schema(configs)`; the description of the original is kept in front.

    With `typed_resource_map`, the open-map branch of `resource` (`{resource: config}`) becomes
    `config_map_schema(configs)` too. That doubles the schema (every config twice: about 12 KB
    instead of 6 KB for the three built-in resources), so it is off by default: the string
    and list forms plus `config` cover one resource with a config, and the map keeps working
    for clients that send it (a strict conversion may empty it, as any free-form map).
    """
    out = portable_schema(schema)
    properties = out["properties"]
    if "config" in properties:
        own = properties["config"].get("description")
        union = config_union_schema(configs, common_properties=common_properties)
        if own:
            union["description"] = f"{own} {union['description']}"
        properties["config"] = union
    resource = properties.get("resource")
    if typed_resource_map and isinstance(resource, dict) and isinstance(resource.get("anyOf"), list):
        resource["anyOf"] = [
            config_map_schema(configs, common_properties=common_properties) if _is_open_map(branch) else branch
            for branch in resource["anyOf"]
        ]
    return out


def _is_open_map(schema: Any) -> bool:
    return (
        isinstance(schema, dict)
        and schema.get("type") == "object"
        and not schema.get("properties")
        and schema.get("additionalProperties") not in (None, False)
    )
