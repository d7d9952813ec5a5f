"""The registry: the evaluators an ``eval`` section lists, built (``build_evaluators``). The names and the
metrics each evaluator produces are the recipe's (``retrain.recipe.METRICS``), so that a recipe is validated
without loading any evaluator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from retrain.evaluators import judge, reference, rubric, schema, toolcalls
from retrain.evaluators.base import Evaluator
from retrain.recipe import EvalSection


def build_evaluators(cfg: EvalSection, *, ask_judge: Any = None) -> tuple[list[Evaluator], list[str]]:
    """The row evaluators the recipe lists, and why any of them cannot be set up (a rubric that does not load).
    ``exact_match``, ``preferred_match``, ``loss`` and ``preferred_loss`` are not here: ``retrain.evaluate``
    computes them itself (they need the holdout loss or the label machinery). ``ask_judge``: a stand-in for the
    judge endpoint (tests)."""
    factories: dict[str, Callable[[], Evaluator]] = {
        "chrf": reference.ChrfEvaluator, "rouge_l": reference.RougeLEvaluator, "json_schema": schema.SchemaEvaluator,
        "tool_calls": toolcalls.ToolCallEvaluator, "judge": lambda: judge.JudgeEvaluator(cfg.judge, ask_judge),
    }  # fmt: skip
    out: list[Evaluator] = []
    failures: list[str] = []
    for spec in cfg.evaluators:
        if isinstance(spec, str):
            if spec in factories:
                out.append(factories[spec]())
            continue
        try:
            out.append(rubric.rubric_evaluator(spec.rubric, spec.name))
        except rubric.RubricError as exc:
            failures.append(str(exc))
    return out, failures


__all__ = ["build_evaluators"]
