"""Render pydantic validation errors as one sentence an LLM can act on."""

from __future__ import annotations

from pydantic import ValidationError


def describe_validation_error(exc: ValidationError, what: str) -> str:
    problems = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        if len(where) > 80:  # a field name is input too: never echo it whole
            where = where[:77] + "..."
        kind = err["type"]
        if kind == "missing":
            problems.append(f"'{where}' is required")
        elif kind == "extra_forbidden":
            problems.append(f"'{where}' is not a known field")
        else:
            given = err.get("input")
            shown = repr(given)
            if len(shown) > 60:
                shown = shown[:57] + "..."
            problems.append(f"'{where}': {err['msg']} (got {shown})")
    if len(problems) > 5:
        problems = [*problems[:5], f"and {len(problems) - 5} more problems"]
    return f"invalid {what}: " + "; ".join(problems)
