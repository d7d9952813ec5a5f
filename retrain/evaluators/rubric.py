"""Rubric plug-ins: a domain check written as a Python callable, named in the recipe.

``eval.evaluators: [{rubric: "mypkg.checks:polite"}]`` (or ``mypkg.checks.polite``, or the name of an entry
point in the group ``loraloop.rubrics``) loads ``polite(prompt_row, answer) -> float``: the holdout row (a
copy: its ``messages`` / ``prompt``, reference answer, ``slices``...) and the model's answer text, returning a
score in [0, 1] (a bool counts as 0 / 1). Its metric is ``rubric:<name>`` (``name`` from the recipe, else
the callable's or entry point's name), computed for every model on every row.

A rubric that cannot be loaded, raises, or returns anything else (a string, NaN, 1.5) makes the gate fail
closed, naming the rubric and the row: a broken check must not pass a candidate.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from core.errors import UsageError
from retrain.evaluators.base import RUBRIC_PREFIX, EvalInput, EvaluatorResult, PerRow
from retrain.recipe import rubric_default_name

Rubric = Callable[[dict[str, Any], str], Any]
ENTRY_POINT_GROUP = "loraloop.rubrics"


class RubricError(UsageError, ValueError):
    """A rubric that cannot be loaded or gave an unusable score (one line, naming the rubric)."""


default_name = rubric_default_name


def load_rubric(spec: str) -> Rubric:
    """The callable ``module:attr`` / ``module.attr`` names, or the entry point ``spec`` in ``loraloop.rubrics``."""
    if ":" not in spec and "." not in spec:
        found = entry_points(group=ENTRY_POINT_GROUP, name=spec)
        if not found:
            raise RubricError(f"rubric {spec!r}: no entry point of that name in the group {ENTRY_POINT_GROUP}")
        try:
            obj = next(iter(found)).load()
        except Exception as exc:  # a plug-in's import can fail in any way
            raise RubricError(f"rubric {spec!r}: its entry point does not load: {type(exc).__name__}: {exc}") from exc
    else:
        module_name, attr = spec.split(":", 1) if ":" in spec else spec.rsplit(".", 1)
        try:
            obj = importlib.import_module(module_name)
        except Exception as exc:
            raise RubricError(f"rubric {spec!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise RubricError(f"rubric {spec!r}: {module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
    if not callable(obj):
        raise RubricError(f"rubric {spec!r}: {type(obj).__name__} is not callable")
    return obj


def checked_score(value: Any) -> float:
    """A rubric's return value as a float in [0, 1]; RubricError otherwise."""
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, int | float) or isinstance(value, complex):
        raise RubricError(f"returned {type(value).__name__} {value!r}, not a number in [0, 1]")
    score = float(value)
    if math.isnan(score) or not 0.0 <= score <= 1.0:
        raise RubricError(f"returned {score!r}, not a number in [0, 1]")
    return score


class RubricEvaluator:
    """One rubric, metric ``rubric:<name>``, scored for every model on every row."""

    def __init__(self, name: str, spec: str, fn: Rubric) -> None:
        self.metric = f"{RUBRIC_PREFIX}{name}"
        self.name, self.spec, self.fn = self.metric, spec, fn

    def _score(self, row: dict[str, Any], answer: str) -> float:
        try:
            value = self.fn(dict(row), answer)
        except Exception as exc:  # the plug-in's own bug: reported, the gate fails closed
            raise RubricError(f"raised {type(exc).__name__}: {exc}") from exc
        return checked_score(value)

    def __call__(self, data: EvalInput) -> EvaluatorResult:
        result = EvaluatorResult(details={"spec": self.spec})
        for model, preds in data.predictions.items():
            scores: PerRow = []
            for i, (row, pred) in enumerate(zip(data.rows, preds, strict=True)):
                try:
                    scores.append(self._score(row, pred.text))
                except RubricError as exc:
                    result.failures.append(f"{self.metric} ({self.spec}) on row {i} ({model}'s answer): {exc}")
                    return result
            result.per_row[model] = {self.metric: scores}
        return result


def rubric_evaluator(spec: str, name: str | None = None) -> RubricEvaluator:
    """Load a rubric (RubricError when it cannot be)."""
    return RubricEvaluator(name or default_name(spec), spec, load_rubric(spec))


__all__ = [
    "ENTRY_POINT_GROUP", "RubricError", "RubricEvaluator", "checked_score", "default_name", "load_rubric",
    "rubric_evaluator",
]  # fmt: skip
