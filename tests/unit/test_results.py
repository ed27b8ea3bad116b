"""The result a call returns: structured content and text built once, identical to the full serializer's."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from mcp_server.app import call_result
from session.envelope import ResultMeta, failure, success
from session.errors import ParameterError
from session.tool_calls import RESULT_BUDGET, CallOutcome


class _Result(BaseModel):
    stdout: str
    exit_code: int | None
    ratio: float
    nested: dict[str, list[int]]


def _meta() -> ResultMeta:
    meta = ResultMeta(tool="run", resource_type="bash", session_id="bash-abc", execution_time_ms=1.5)
    meta.expires_at = datetime(2026, 12, 2, 9, 30, 1, 123456, tzinfo=UTC)
    return meta


def _check(outcome: CallOutcome) -> None:
    """What the fast path hands the SDK equals what pydantic's serializer and a fresh rendering give."""
    envelope = outcome.envelope
    assert outcome.structured() == envelope.model_dump(mode="json")
    assert outcome.text() == envelope.text()
    wire = call_result(outcome)
    assert wire["structuredContent"] == envelope.model_dump(mode="json")
    assert wire["content"][0]["text"] == envelope.text()


def test_a_result_model_takes_the_fast_path_and_matches_the_serializer() -> None:
    data = _Result(stdout='héllo \x00 \u2028 "quoted"', exit_code=0, ratio=0.25, nested={"a": [1, 2]})
    outcome = CallOutcome.capped(success(data, _meta()), [])
    assert outcome.data_json is not None
    assert json.loads(outcome.data_json) == outcome.envelope.data
    _check(outcome)


def test_values_json_lacks_fall_back_to_the_serializer() -> None:
    for odd in ({"when": datetime(2026, 1, 1, tzinfo=UTC)}, {"where": Path("/tmp/x")}, {"ratio": math.inf}):
        outcome = CallOutcome.capped(success(dict(odd), _meta()), [])
        assert outcome.data_json is None, odd
        assert outcome.structured() == outcome.envelope.model_dump(mode="json")
        assert outcome.text() == outcome.envelope.text()


def test_errors_and_uncapped_outcomes_match_too() -> None:
    error = failure(ParameterError("bad 'x'", data={"input_schema": {"type": "object"}}), _meta())
    _check(CallOutcome.capped(error, []))
    _check(CallOutcome(error))  # the server's backstop builds outcomes without the cap


def test_a_capped_result_is_rendered_after_cutting() -> None:
    outcome = CallOutcome.capped(success({"stdout": "\x01" * RESULT_BUDGET}, _meta()), [])
    assert outcome.envelope.data["result_truncated"] is True
    assert outcome.data_json is not None
    assert json.loads(outcome.data_json) == outcome.envelope.data
    assert len(outcome.data_json.encode()) < RESULT_BUDGET
    _check(outcome)
