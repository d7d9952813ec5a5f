"""Reference metrics: how close each answer is to the reference answer, and the loss of the preferred answers.

* ``chrf`` — sentence chrF (sacrebleu's ``CHRF``, its defaults: character 6-grams, beta 2) of the answer
  against the row's reference, on a 0–1 scale (sacrebleu's score / 100); the gate's figure is the mean over
  rows. Identical texts score 1 (sacrebleu gives two empty texts 0).
* ``rouge_l`` — ROUGE-L F-measure (Google's ``rouge_score``) over lowercase ``\\w+`` tokens: rouge_score's own
  tokenizer keeps only ``a-z0-9`` and would score every non-Latin answer 0.
* ``preferred_neg_loss`` — minus the mean completion-token loss of the preferred (``chosen``) answer of each
  held-out preference pair under the model (``preferred_loss`` is reported beside it): does the model find
  the answers people preferred more likely? The losses come from ``retrain.holdout_loss.completion_losses``.

The reference of a supervised row is its answer; of a preference pair, the chosen answer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import regex

from retrain.evaluators.base import EvalInput, EvaluatorResult, PerRow, Prediction, normalize, per_model


def reference_answer(row: dict[str, Any]) -> str | None:
    """The reference answer of a holdout row (supervised: the answer; pair: the chosen answer)."""
    if "chosen" in row:
        return normalize(str(row.get("chosen_answer", row["chosen"])))
    value = row.get("answer", row.get("completion"))
    return None if value is None else normalize(str(value))


def chrf(answer: str, reference: str) -> float:
    """Sentence chrF on a 0–1 scale."""
    if answer == reference:
        return 1.0
    return float(_chrf_metric().sentence_score(answer, [reference]).score) / 100.0


@functools.cache
def _chrf_metric() -> Any:
    from sacrebleu.metrics import CHRF

    return CHRF()


class _WordTokenizer:
    """Lowercase Unicode word tokens (``rouge_score`` takes any object with ``tokenize``)."""

    def tokenize(self, text: str) -> list[str]:
        return regex.findall(r"\w+", text.lower())


@functools.cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F-measure (0–1)."""
    if answer == reference:
        return 1.0
    return float(_rouge_scorer().score(reference, answer)["rougeL"].fmeasure)


def _scorer(metric: str, fn: Any) -> Any:
    def score(rows: Sequence[dict[str, Any]], preds: Sequence[Prediction]) -> dict[str, PerRow]:
        out: PerRow = []
        for row, pred in zip(rows, preds, strict=True):
            ref = reference_answer(row)
            out.append(None if ref is None else fn(pred.text, ref))
        return {metric: out}

    return score


score_chrf = _scorer("chrf", chrf)
score_rouge_l = _scorer("rouge_l", rouge_l)


class ChrfEvaluator:
    """``chrf`` for every model."""

    name = "chrf"

    def __call__(self, data: EvalInput) -> EvaluatorResult:
        return per_model(data, score_chrf)


class RougeLEvaluator:
    """``rouge_l`` for every model."""

    name = "rouge_l"

    def __call__(self, data: EvalInput) -> EvaluatorResult:
        return per_model(data, score_rouge_l)


def preferred_loss_scores(rows: Sequence[dict[str, Any]], losses: Sequence[tuple[float, int] | None]) -> PerRow:
    """``preferred_neg_loss`` per row from (summed loss, token count) of each pair row's chosen answer; None for
    supervised rows (no loss given) and answers without tokens."""
    out: PerRow = []
    for row, loss in zip(rows, losses, strict=True):
        out.append(-loss[0] / loss[1] if "chosen" in row and loss is not None and loss[1] else None)
    return out


__all__ = [
    "ChrfEvaluator", "RougeLEvaluator", "chrf", "preferred_loss_scores", "reference_answer", "rouge_l", "score_chrf",
    "score_rouge_l",
]  # fmt: skip
