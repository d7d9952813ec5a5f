"""The gate's evaluators, one module per family (``judge``, ``reference``, ``toolcalls``, ``schema``,
``rubric``) over the shared types in ``base``, built by ``registry``; docs/retrain.md, "Choosing evaluators"."""

from retrain.evaluators.base import (
    DEFAULT_EVALUATORS,
    METRICS,
    EvalInput,
    Evaluator,
    EvaluatorResult,
    Prediction,
    ToolCall,
)
from retrain.evaluators.registry import build_evaluators

__all__ = [
    "DEFAULT_EVALUATORS", "METRICS", "EvalInput", "Evaluator", "EvaluatorResult", "Prediction", "ToolCall",
    "build_evaluators",
]  # fmt: skip
