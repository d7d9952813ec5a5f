"""Tool-call metrics: did the model call the right tool with the right arguments?

Scope: rows that offered ``tools`` or carry an explicit ``reference_tool_calls``. The expected calls of a row
are, in this order, ``reference_tool_calls``, the good answer's calls as the data preparation writes them
(``answer_tool_calls`` of a formatted supervised row, ``completion_tool_calls`` of an exported one,
``chosen_tool_calls`` of a preference pair), else none (the good answer was text). A call is ``{name,
arguments}`` with ``arguments`` JSON text or an object; the OpenAI shape ``{type: function, function: {name,
arguments}}`` is read too.

Per row (None where a metric does not apply):

* ``tool_valid_rate`` — the fraction of the model's calls that are valid: the name is one of the offered
  tools, the arguments parse as a JSON object and validate against the tool's ``parameters`` schema
  (jsonschema). None when the model made no call.
* ``tool_name_accuracy`` — 1 when the called names equal the expected names as multisets (order of parallel
  calls ignored; no call expected and none made counts as right).
* ``tool_exact_match`` — 1 when the calls equal the expected calls as multisets of (name, arguments), the
  arguments compared as JSON values (key order and whitespace ignored).
* ``tool_field_f1`` — F1 over the (tool name, argument key, JSON value) triples of all calls; 1 when both
  sides have none.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

from retrain.evaluators.base import EvalInput, EvaluatorResult, PerRow, Prediction, ToolCall, per_model

_MISSING = object()


def _call_of(value: Any) -> ToolCall | None:
    if isinstance(value, ToolCall):
        return value
    if not isinstance(value, dict):
        return None
    fn: dict[str, Any] = value["function"] if isinstance(value.get("function"), dict) else value
    name = fn.get("name")
    if not isinstance(name, str):
        return None
    args = fn.get("arguments", "")
    return ToolCall(name, args if isinstance(args, str) else json.dumps(args))


def expected_calls(row: dict[str, Any]) -> list[ToolCall] | None:
    """The calls the row expects; None when the row is out of the tool metrics' scope."""
    given = row.get("reference_tool_calls", _MISSING)
    if given is _MISSING:
        if not row.get("tools"):
            return None
        if "chosen" in row:
            given = row.get("chosen_tool_calls")
        else:
            given = row.get("answer_tool_calls", row.get("completion_tool_calls"))
    if isinstance(given, str):
        try:
            given = json.loads(given)
        except ValueError:
            given = None
    calls = [_call_of(c) for c in given or ()]
    return [c for c in calls if c is not None]


def parse_arguments(call: ToolCall) -> dict[str, Any] | None:
    """The call's arguments as a JSON object; None when they are not one."""
    try:
        value = json.loads(call.arguments or "{}")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def offered_schemas(row: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """The offered tools' names -> their ``parameters`` JSON schema (None when a tool gives none)."""
    out: dict[str, dict[str, Any] | None] = {}
    for tool in row.get("tools") or ():
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            out[fn["name"]] = params if isinstance(params, dict) else None
    return out


def is_valid_call(call: ToolCall, schemas: dict[str, dict[str, Any] | None]) -> bool:
    """Offered name, JSON-object arguments that validate against the tool's parameters schema."""
    import jsonschema

    args = parse_arguments(call)
    if args is None or (schemas and call.name not in schemas):
        return False
    schema = schemas.get(call.name)
    if schema is None:
        return True
    try:
        jsonschema.validate(args, schema)
    except jsonschema.ValidationError:
        return False
    except jsonschema.SchemaError:
        return True  # the tool's own schema is broken: the call cannot be blamed for it
    return True


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _call_key(call: ToolCall) -> tuple[str, str]:
    args = parse_arguments(call)
    return call.name, _canonical(args) if args is not None else "\x00" + call.arguments


def _fields(calls: Sequence[ToolCall]) -> Counter[tuple[str, str, str]]:
    out: Counter[tuple[str, str, str]] = Counter()
    for c in calls:
        for key, value in (parse_arguments(c) or {}).items():
            out[(c.name, key, _canonical(value))] += 1
    return out


def field_f1(predicted: Sequence[ToolCall], expected: Sequence[ToolCall]) -> float:
    """F1 over (name, key, value) argument triples (multisets); 1.0 when neither side has any."""
    pred, ref = _fields(predicted), _fields(expected)
    if not pred and not ref:
        return 1.0 if Counter(c.name for c in predicted) == Counter(c.name for c in expected) else 0.0
    overlap = sum((pred & ref).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(pred.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def score_row(row: dict[str, Any], prediction: Prediction) -> dict[str, float | None]:
    """The four tool metrics of one row (all None when the row is out of scope)."""
    expected = expected_calls(row)
    if expected is None:
        return dict.fromkeys(("tool_valid_rate", "tool_name_accuracy", "tool_exact_match", "tool_field_f1"))
    made = list(prediction.tool_calls)
    schemas = offered_schemas(row)
    valid = sum(is_valid_call(c, schemas) for c in made) / len(made) if made else None
    return {
        "tool_valid_rate": valid,
        "tool_name_accuracy": float(Counter(c.name for c in made) == Counter(c.name for c in expected)),
        "tool_exact_match": float(Counter(map(_call_key, made)) == Counter(map(_call_key, expected))),
        "tool_field_f1": field_f1(made, expected),
    }


def score_tool_calls(rows: Sequence[dict[str, Any]], preds: Sequence[Prediction]) -> dict[str, PerRow]:
    """Per-row tool metrics of one model's predictions."""
    out: dict[str, PerRow] = {}
    for row, pred in zip(rows, preds, strict=True):
        for metric, value in score_row(row, pred).items():
            out.setdefault(metric, []).append(value)
    return out


class ToolCallEvaluator:
    """``tool_calls``: the four metrics above for every model."""

    name = "tool_calls"

    def __call__(self, data: EvalInput) -> EvaluatorResult:
        result = per_model(data, score_tool_calls)
        result.details = {"rows": sum(expected_calls(r) is not None for r in data.rows)}
        return result


__all__ = [
    "ToolCallEvaluator", "expected_calls", "field_f1", "is_valid_call", "offered_schemas", "parse_arguments",
    "score_row", "score_tool_calls",
]  # fmt: skip
