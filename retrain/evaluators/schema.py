"""Schema validity of structured-output traffic: ``schema_valid_rate``.

Scope: rows whose ``response_format`` asked for JSON. ``{"type": "json_schema", "json_schema": {"schema":
...}}``: the answer must parse as JSON and validate against the schema (jsonschema, the draft the schema
names, else the latest); ``{"type": "json_object"}``: the answer must parse as a JSON object. 1 or 0 per row.

The gate generates such rows with their ``response_format`` (what production serves), so on a back-end that
enforces it (vLLM's structured outputs) a 0 mostly means an answer cut by ``eval.max_tokens``; where it is not
enforced, it measures the model itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from retrain.evaluators.base import EvalInput, EvaluatorResult, PerRow, Prediction, per_model


def requested_schema(row: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a row's ``response_format`` asks for; None when out of scope (no JSON asked for, or a
    schema that is itself invalid: no answer can be blamed for that)."""
    import jsonschema

    schema = _schema_of(row)
    if schema is None:
        return None
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError:
        return None
    return schema


def _schema_of(row: dict[str, Any]) -> dict[str, Any] | None:
    fmt = row.get("response_format")
    if isinstance(fmt, str):
        try:
            fmt = json.loads(fmt)
        except ValueError:
            return None
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "object"}
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else {}
    return None


def is_schema_valid(answer: str, schema: dict[str, Any]) -> bool:
    """The answer parses as JSON and validates against ``schema``."""
    import jsonschema

    try:
        value = json.loads(answer)
    except ValueError:
        return False
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    return True


def score_schema(rows: Sequence[dict[str, Any]], preds: Sequence[Prediction]) -> dict[str, PerRow]:
    """Per-row schema validity (None for rows that did not ask for JSON)."""
    out: PerRow = []
    for row, pred in zip(rows, preds, strict=True):
        schema = requested_schema(row)
        out.append(None if schema is None else float(is_schema_valid(pred.text.strip(), schema)))
    return {"schema_valid_rate": out}


class SchemaEvaluator:
    """``json_schema``: schema validity for every model."""

    name = "json_schema"

    def __call__(self, data: EvalInput) -> EvaluatorResult:
        result = per_model(data, score_schema)
        result.details = {"rows": sum(requested_schema(r) is not None for r in data.rows)}
        return result


__all__ = ["SchemaEvaluator", "is_schema_valid", "requested_schema", "score_schema"]
