"""What every evaluator of the gate shares: the predictions it scores, what it returns, and the registry of
evaluator names and the metrics each one produces.

An evaluator is a scoring function over the holdout rows and the models' predictions (``EvalInput``). It
returns *per-row* scores per model and metric (``None`` where the metric does not apply to the row), so the
gate's per-slice and per-intersection machinery (``retrain.evaluate``) works for every metric alike. What it
could not score is a *failure*: the gate fails closed with that reason (a judge endpoint that is down, a
rubric that raised). ``retrain.evaluators.registry`` builds the evaluators a recipe lists; the scoring
libraries load lazily, when an evaluator runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# The names a recipe may use live with the recipe (which must not import the evaluators: no import cycle).
from retrain.recipe import (
    DEFAULT_EVALUATORS,
    METRICS,
    NOT_GATEABLE,
    RUBRIC_PREFIX,
    evaluator_of,
    gateable_metrics,
)

#: Per-row scores of one metric, in [0, 1] unless the metric says otherwise; None = not applicable to the row.
PerRow = list[float | None]


def normalize(text: str | None, stop: Sequence[str] = ("<|im_end|>", "</s>")) -> str:
    """Answer text for comparisons: cut at an end-of-turn marker, strip whitespace."""
    t = text or ""
    for s in stop:
        t = t.split(s, 1)[0]
    return t.strip()


@dataclass(frozen=True)
class ToolCall:
    """One tool call as a model wrote it: the function's name and its arguments as JSON text."""

    name: str
    arguments: str = ""


@dataclass(frozen=True)
class Prediction:
    """One model's answer to one row: the text and the tool calls (chat rows that offered ``tools``)."""

    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class EvalInput:
    """The rows scored (holdout rows, then preference-pair rows) and each model's prediction per row."""

    rows: Sequence[dict[str, Any]]
    predictions: Mapping[str, Sequence[Prediction]]
    candidate: str = "candidate"
    reference: str = "champion"


@dataclass
class EvaluatorResult:
    """Per-row scores (model -> metric -> scores), extra overall figures per model (intervals), details for
    the gate result, and the reasons the gate must fail closed."""

    per_row: dict[str, dict[str, PerRow]] = field(default_factory=dict)
    overall: dict[str, dict[str, float]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


class Evaluator(Protocol):
    """A named scoring function of the gate."""

    name: str

    def __call__(self, data: EvalInput) -> EvaluatorResult: ...


def per_model(
    data: EvalInput, score: Callable[[Sequence[dict[str, Any]], Sequence[Prediction]], dict[str, PerRow]]
) -> EvaluatorResult:
    """An evaluator result from a function that scores one model's predictions on its own."""
    return EvaluatorResult(per_row={model: score(data.rows, preds) for model, preds in data.predictions.items()})


def mean(values: Sequence[float | None]) -> float | None:
    """The mean of the applicable scores; None when none applies."""
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None


__all__ = [
    "DEFAULT_EVALUATORS", "METRICS", "NOT_GATEABLE", "RUBRIC_PREFIX", "EvalInput", "Evaluator", "EvaluatorResult",
    "PerRow", "Prediction", "ToolCall", "evaluator_of", "gateable_metrics", "mean", "normalize", "per_model",
]  # fmt: skip
