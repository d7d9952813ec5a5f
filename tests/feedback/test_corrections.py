"""A correction given as the wanted tool call: normalised for the store, or refused with a reason."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from feedback.events import FeedbackEvent


def _correction(value: object) -> FeedbackEvent:
    return FeedbackEvent(request_id="r1", kind="correction", value=value)


def test_openai_shaped_tool_call_is_normalised() -> None:
    value = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "refund", "arguments": '{"order_id": "A-1", "amount": 5}'}},
        {"function": {"name": "escalate", "arguments": {"reason": "angry"}}},
    ]}  # fmt: skip
    event = _correction(value)
    assert event.value == {
        "content": None,
        "tool_calls": [
            {"id": "c1", "name": "refund", "arguments": '{"order_id":"A-1","amount":5}'},
            {"id": None, "name": "escalate", "arguments": '{"reason":"angry"}'},
        ],
    }
    assert json.loads(event.model_dump_json())["value"] == event.value  # what the WAL line carries


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ({"tool_calls": []}, "a list of 1 to 128 calls"),
        ({"tool_calls": [{"function": {"name": "bad name!", "arguments": "{}"}}]}, "function.name"),
        ({"tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}, "not valid JSON"),
        ({"tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}]}, "must be a JSON object"),
        ({"tool_calls": [{"type": "code", "function": {"name": "f"}}]}, "type must be 'function'"),
        ({"tool_calls": ["f()"]}, "must be an object with a function"),
        ({"role": "user", "tool_calls": [{"function": {"name": "f"}}]}, "role must be 'assistant'"),
        ({"tool_calls": [{"function": {"name": "f"}}], "weights": 1}, "only role, content and tool_calls"),
        ({"content": 3, "tool_calls": [{"function": {"name": "f"}}]}, "content must be a string"),
    ],
)
def test_malformed_tool_call_corrections_are_refused(value: object, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        _correction(value)


@pytest.mark.parametrize("kind", ["score", "thumbs", "label", "comment"])
def test_objects_are_corrections_only(kind: str) -> None:
    with pytest.raises(ValidationError):
        FeedbackEvent(request_id="r1", kind=kind, value={"tool_calls": [{"function": {"name": "f"}}]})
