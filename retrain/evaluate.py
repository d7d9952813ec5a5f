"""The evaluation gate: candidate vs champion (and vs the base) on the holdout.

* Loss / perplexity: a transformers forward pass over the holdout (completion tokens only; ``retrain.holdout_loss``).
* Task metrics from generations through vLLM with the adapter loaded at runtime (``retrain.generation``: under a
  unique name, temperature 0, concurrent requests, unloaded afterwards): exact match; accuracy and
  macro precision / recall / F1 when the answers are label-like; the rate at which the answer matches the
  preferred one of the holdout's preference pairs. Rows that offered ``tools`` or asked for a
  ``response_format`` are sent as chat requests with them, and the answers' ``tool_calls`` are kept.
* The evaluators the recipe lists (``retrain.evaluators``: judge, chrF / ROUGE-L, tool calls, JSON schema,
  rubric plug-ins, loss on preferred answers) add per-row metrics; anything they could not score fails the
  gate closed with the reason.
* Per-slice metrics for every slice attribute and every intersection of two attributes, for every metric.
* The verdict: fails when a slice with at least ``min_slice_samples`` rows drops by more than
  ``slice_tolerance`` against the reference (the champion; the base when there is none), or when the
  overall primary metric does not beat the reference by more than ``min_improvement`` (``judge_win_rate``:
  when the Wilson lower bound does not exceed ``judge.threshold``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrain.evaluators.base import EvalInput, PerRow, Prediction, mean, normalize
from retrain.evaluators.registry import build_evaluators
from retrain.generation import generate_predictions, loaded_adapters, vllm_server
from retrain.holdout_loss import completion_losses, loss_figures
from retrain.recipe import EvalSection

log = logging.getLogger(__name__)

#: Primary metrics that are not a mean of per-row scores: slices gate on exact_match (as the gate always did).
SLICE_FALLBACK = frozenset({"neg_loss", "preferred_match_rate"})
#: Evaluators that need generations.
GENERATING = frozenset({"exact_match", "preferred_match", "chrf", "rouge_l", "judge", "tool_calls", "json_schema"})


def is_label_like(answers: Sequence[str], max_labels: int = 20, max_words: int = 3) -> bool:
    """Few distinct, short answers: a classification task."""
    distinct = set(answers)
    return 1 <= len(distinct) <= max_labels and all(len(a.split()) <= max_words for a in distinct)


def label_metrics(refs: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 over the reference labels (numpy; sklearn's definitions with
    zero_division=0, labels = the reference classes)."""
    r, p = np.asarray(refs, dtype=object), np.asarray(preds, dtype=object)
    labels = sorted(set(refs))
    precision, recall, f1 = [], [], []
    for lab in labels:
        tp = float(np.sum((p == lab) & (r == lab)))
        fp = float(np.sum((p == lab) & (r != lab)))
        fn = float(np.sum((p != lab) & (r == lab)))
        pr = tp / (tp + fp) if tp + fp else 0.0
        rc = tp / (tp + fn) if tp + fn else 0.0
        precision.append(pr)
        recall.append(rc)
        f1.append(2 * pr * rc / (pr + rc) if pr + rc else 0.0)
    return {
        "accuracy": float(np.mean(r == p)) if len(r) else 0.0,
        "macro_precision": float(np.mean(precision)) if labels else 0.0,
        "macro_recall": float(np.mean(recall)) if labels else 0.0,
        "macro_f1": float(np.mean(f1)) if labels else 0.0,
    }


def task_metrics(refs: Sequence[str], preds: Sequence[str], *, label_like: bool) -> dict[str, float]:
    refs_n, preds_n = [normalize(x) for x in refs], [normalize(x) for x in preds]
    out = {"exact_match": float(np.mean([a == b for a, b in zip(refs_n, preds_n, strict=True)])) if refs_n else 0.0}
    if label_like:
        out.update(label_metrics(refs_n, preds_n))
    out["n"] = float(len(refs_n))
    return out


def slice_keys(rows: Sequence[dict[str, Any]], attributes: Sequence[str] | None = None) -> dict[str, list[int]]:
    """Row indices of every slice ``attr=value`` and of every two-attribute intersection ``a=x&b=y``."""
    attrs = sorted({k for r in rows for k in (r.get("slices") or {})})
    if attributes is not None:
        attrs = [a for a in attrs if a in attributes]
    out: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        s = r.get("slices") or {}
        present = [(a, str(s[a])) for a in attrs if a in s and s[a] is not None]
        for a, v in present:
            out.setdefault(f"{a}={v}", []).append(i)
        for (a, v), (b, w) in itertools.combinations(present, 2):
            out.setdefault(f"{a}={v}&{b}={w}", []).append(i)
    return out


@dataclass
class ModelScores:
    """Holdout figures of one model (base, champion or candidate)."""

    name: str
    overall: dict[str, float]
    slices: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class GateResult:
    """The gate's verdict and every figure behind it (``evaluators``: each evaluator's details, e.g. the judge's
    prompt version, verdict counts, Wilson interval and human agreement)."""

    passed: bool
    reasons: list[str]
    primary_metric: str
    reference: str
    scores: dict[str, ModelScores]
    slice_checks: list[dict[str, Any]]
    label_like: bool
    evaluators: dict[str, Any] = field(default_factory=dict)
    #: lines shown under the verdict about how the candidate was made (e.g. its cross-validated loss)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """The verdict as a plain-text table (overall metrics, evaluator notes, then gated slices)."""
        names = list(self.scores)
        metrics = sorted({k for s in self.scores.values() for k in s.overall})
        w = max([len("metric"), *map(len, metrics)]) + 2
        lines = [f"gate: {'PASSED' if self.passed else 'FAILED'} (primary {self.primary_metric}, vs {self.reference})"]
        lines.append("metric".ljust(w) + "".join(n.rjust(12) for n in names))
        for m in metrics:
            vals = [self.scores[n].overall.get(m) for n in names]
            lines.append(m.ljust(w) + "".join(("-" if v is None else f"{v:.4f}").rjust(12) for v in vals))
        lines.extend(_judge_lines(self.evaluators.get("judge")))
        if self.slice_checks:
            sw = max(len(c["slice"]) for c in self.slice_checks) + 2
            lines.append("")
            lines.append("slice".ljust(sw) + "n".rjust(5) + "reference".rjust(12) + "candidate".rjust(12) + "  ok")
            for c in self.slice_checks:
                ok = "yes" if c["ok"] else ("NO" if c["gated"] else "(n<min)")
                lines.append(c["slice"].ljust(sw) + str(c["n"]).rjust(5) + f"{c['reference']:.4f}".rjust(12)
                             + f"{c['candidate']:.4f}".rjust(12) + f"  {ok}")  # fmt: skip
        lines.extend(f"- {r}" for r in self.reasons)
        lines.extend(f"  {n}" for n in self.notes)
        return "\n".join(lines)


def _judge_lines(judge: dict[str, Any] | None) -> list[str]:
    if not judge or "asked" not in judge:
        return []
    lines = [
        f"judge {judge['model']} prompt {judge['prompt_version']} ({judge['prompt_sha256'][:12]}): "
        f"{judge['wins']} wins / {judge['ties']} ties / {judge['losses']} losses of {judge['n']} prompts, "
        f"{judge['asked']} verdicts asked, {judge['errors']} errors, {judge['unparseable']} unparseable"
    ]
    agreement = judge.get("human_agreement")
    if agreement and agreement["agreement"] is not None:
        kappa = "-" if agreement["kappa"] is None else f"{agreement['kappa']:.3f}"
        lines.append(f"judge-human agreement {agreement['agreement']:.3f} on {agreement['judged']} of "
                     f"{agreement['pairs']} preference pairs (Cohen's kappa {kappa})")  # fmt: skip
    return lines


def score(
    name: str,
    rows: Sequence[dict[str, Any]],
    preds: Sequence[str],
    *,
    label_like: bool,
    attributes: Sequence[str] | None = None,
    extra: dict[str, float] | None = None,
) -> ModelScores:
    """Overall and per-slice task metrics of ``preds`` against the rows' ``answer``."""
    refs = [str(r.get("answer", r.get("completion", ""))) for r in rows]
    overall = task_metrics(refs, preds, label_like=label_like)
    overall.update(extra or {})
    slices = {}
    for key, idx in slice_keys(rows, attributes).items():
        slices[key] = task_metrics([refs[i] for i in idx], [preds[i] for i in idx], label_like=label_like)
    return ModelScores(name, overall, slices)


def add_row_metrics(
    scores: ModelScores, rows: Sequence[dict[str, Any]], per_row: dict[str, PerRow],
    attributes: Sequence[str] | None = None,
) -> None:  # fmt: skip
    """Add per-row metrics to ``scores``: overall and per-slice means over the rows a metric applies to
    (``n_<metric>`` in each slice counts them)."""
    keys = slice_keys(rows, attributes)
    for metric, values in per_row.items():
        overall = mean(values)
        if overall is None:
            continue
        scores.overall[metric] = overall
        for key, idx in keys.items():
            present = [float(v) for v in (values[i] for i in idx) if v is not None]
            if present:
                slot = scores.slices.setdefault(key, {})
                slot[metric], slot[f"n_{metric}"] = sum(present) / len(present), float(len(present))


def _primary_check(candidate: ModelScores, reference: ModelScores, cfg: EvalSection) -> tuple[bool, str]:
    metric = cfg.primary_metric
    cand, ref = candidate.overall.get(metric), reference.overall.get(metric)
    if cand is None or ref is None:
        return False, f"primary metric {metric} is not available"
    if metric == "judge_win_rate":
        low, threshold = candidate.overall.get("judge_win_rate_low", 0.0), cfg.judge.threshold
        interval = f"{cand:.4f} (Wilson {cfg.judge.confidence:g} lower bound {low:.4f})"
        if not low > threshold:
            return False, f"judge_win_rate {interval} vs {reference.name} does not clear the threshold {threshold}"
        return True, f"judge_win_rate {interval} vs {reference.name} clears the threshold {threshold}"
    if not cand - ref > cfg.min_improvement:
        by = cfg.min_improvement
        return False, f"{metric} {cand:.4f} does not beat {reference.name}'s {ref:.4f} by more than {by}"
    return True, f"{metric} {cand:.4f} vs {reference.name}'s {ref:.4f} (+{cand - ref:.4f})"


def decide(
    candidate: ModelScores, reference: ModelScores, cfg: EvalSection, *, others: Sequence[ModelScores] = ()
) -> GateResult:
    """The verdict of ``candidate`` against ``reference`` (see the module docs)."""
    metric = cfg.primary_metric
    passed, reason = _primary_check(candidate, reference, cfg)
    reasons = [reason]
    checks = []
    slice_metric = "exact_match" if metric in SLICE_FALLBACK else metric
    for key in sorted(set(candidate.slices) & set(reference.slices)):
        c, r = candidate.slices[key], reference.slices[key]
        if slice_metric not in c or slice_metric not in r:
            continue  # the metric applies to no row of this slice
        n = int(c.get(f"n_{slice_metric}", c.get("n", 0)))
        cv, rv = float(c[slice_metric]), float(r[slice_metric])
        gated = n >= cfg.min_slice_samples
        ok = not gated or cv >= rv - cfg.slice_tolerance
        checks.append({"slice": key, "n": n, "metric": slice_metric, "reference": rv, "candidate": cv,
                       "delta": cv - rv, "gated": gated, "ok": ok})  # fmt: skip
        if not ok:
            passed = False
            reasons.append(f"slice {key} (n={n}) regressed: {slice_metric} {cv:.4f} < {rv:.4f} - {cfg.slice_tolerance}")
    scores = {s.name: s for s in [*others, reference, candidate]}
    label_like = "accuracy" in candidate.overall
    return GateResult(passed, reasons, metric, reference.name, scores, checks, label_like)


def _losses(cfg: EvalSection, base: str, models: dict[str, Path | None], holdout: Sequence[dict[str, Any]],
            pairs: Sequence[dict[str, Any]]) -> dict[str, tuple[dict[str, float], PerRow]]:  # fmt: skip
    """Per model: the holdout loss figures (``loss``) and per-row preferred_neg_loss (``preferred_loss``)."""
    from retrain.evaluators.reference import preferred_loss_scores

    names = cfg.evaluator_names
    items = [(str(r["prompt"]), str(r["completion"])) for r in holdout] if "loss" in names else []
    preferred = [(str(r["prompt"]), str(r["chosen"])) for r in pairs] if "preferred_loss" in names else []
    out = {}
    for name, path in models.items():
        losses = completion_losses(base, path, items + preferred) if items or preferred else []
        figures = loss_figures(losses[: len(items)]) if items else {}
        per_pair: list[tuple[float, int] | None] = [*losses[len(items) :]] if preferred else [None] * len(pairs)
        none: PerRow = [None] * len(holdout)
        out[name] = (figures, none + preferred_loss_scores(pairs, per_pair))
    return out


def _predictions(cfg: EvalSection, base: str, models: dict[str, Path | None], rows: Sequence[dict[str, Any]],
                 run_id: str, work_dir: Path) -> dict[str, list[Prediction]]:  # fmt: skip
    """Every model's answers to the rows (empty answers when nothing listed needs them)."""
    preds = {n: [Prediction()] * len(rows) for n in models}
    listed = set(cfg.evaluator_names)
    needed = bool(listed & GENERATING) or any(n.startswith("rubric:") for n in listed)
    if cfg.skip_generation or not rows or not needed:
        return preds
    names = {n: (cfg.served_model_name if p is None else f"eval-{run_id}-{n}") for n, p in models.items()}
    with (
        vllm_server(cfg, cfg.base_model or base, log_path=work_dir / "vllm.log") as url,
        loaded_adapters(url, {names[n]: p for n, p in models.items() if p is not None}),
    ):
        for n in models:
            preds[n] = generate_predictions(url, names[n], rows, max_tokens=cfg.max_tokens, concurrency=cfg.concurrency)
    return preds


def _legacy_scores(cfg: EvalSection, name: str, holdout: Sequence[dict[str, Any]], pairs: Sequence[dict[str, Any]],
                   preds: Sequence[Prediction], label_like: bool) -> ModelScores:  # fmt: skip
    """exact_match (+ label metrics) on the holdout and preferred_match_rate on the pairs, as the gate always
    computed them; the slices' row counts when exact_match is not listed."""
    names = cfg.evaluator_names
    texts = [p.text for p in preds]
    extra: dict[str, float] = {}
    if pairs and "preferred_match" in names:
        chosen = [normalize(str(r["chosen"])) for r in pairs]
        got = texts[len(holdout) :]
        extra["preferred_match_rate"] = float(np.mean([a == c for a, c in zip(got, chosen, strict=True)]))
    if "exact_match" in names:
        return score(name, holdout, texts[: len(holdout)], label_like=label_like, attributes=cfg.slice_attributes,
                     extra=extra)  # fmt: skip
    slices = {k: {"n": float(len(idx))} for k, idx in slice_keys(holdout, cfg.slice_attributes).items()}
    return ModelScores(name, {"n": float(len(holdout)), **extra}, slices)


def gate(
    cfg: EvalSection,
    *,
    holdout: Sequence[dict[str, Any]],
    pairs: Sequence[dict[str, Any]],
    predictions: dict[str, list[Prediction]],
    losses: dict[str, tuple[dict[str, float], PerRow]] | None = None,
    ask_judge: Any = None,
) -> GateResult:
    """The verdict from the models' answers to ``holdout + pairs`` (``predictions``: ``base``, maybe
    ``champion``, ``candidate``) and their losses (``_losses``): every listed metric, per slice, decided."""
    holdout, pairs = list(holdout), list(pairs)
    rows = holdout + pairs
    reference = "champion" if "champion" in predictions else "base"
    evaluators, failures = build_evaluators(cfg, ask_judge=ask_judge)
    if failures:
        return GateResult(False, failures, cfg.primary_metric, reference, {}, [], False)
    answers = [normalize(str(r.get("answer", r.get("completion", "")))) for r in holdout]
    label_like = is_label_like(answers, cfg.max_labels)
    scores: dict[str, ModelScores] = {}
    for n, preds in predictions.items():
        figures, preferred = (losses or {}).get(n, ({}, [None] * len(rows)))
        scores[n] = _legacy_scores(cfg, n, holdout, pairs, preds, label_like)
        scores[n].overall.update(figures)
        add_row_metrics(scores[n], rows, {"preferred_neg_loss": preferred}, cfg.slice_attributes)
        if "preferred_neg_loss" in scores[n].overall:
            scores[n].overall["preferred_loss"] = -scores[n].overall["preferred_neg_loss"]
    details: dict[str, Any] = {}
    if not cfg.skip_generation:
        data = EvalInput(rows, predictions, "candidate", reference)
        for ev in evaluators:
            res = ev(data)
            for n, per_row in res.per_row.items():
                add_row_metrics(scores[n], rows, per_row, cfg.slice_attributes)
            for n, extra in res.overall.items():
                scores[n].overall.update(extra)
            details[ev.name], failures = res.details, failures + res.failures
    others = [s for n, s in scores.items() if n not in ("candidate", reference)]
    result = decide(scores["candidate"], scores[reference], cfg, others=others)
    result.label_like, result.evaluators = label_like, details
    if failures:  # fail closed: what could not be scored comes first, as the run's one-line reason
        result.passed, result.reasons = False, [*failures, *result.reasons]
    return result


def evaluate(
    cfg: EvalSection,
    *,
    base: str,
    holdout: Sequence[dict[str, Any]],
    pairs: Sequence[dict[str, Any]],
    candidate: Path,
    champion: Path | None,
    run_id: str,
    work_dir: Path,
    ask_judge: Any = None,
) -> GateResult:
    """Score base, champion and candidate on the holdout and decide (see the module docs). ``ask_judge``: a
    stand-in for the judge endpoint (tests; ``retrain.evaluators.judge.AskJudge``)."""
    holdout, pairs = list(holdout), list(pairs)
    models: dict[str, Path | None] = {"base": None}
    if champion is not None:
        models["champion"] = champion
    models["candidate"] = candidate
    _, failures = build_evaluators(cfg, ask_judge=ask_judge)
    if failures:  # a rubric that does not load: no generations for a gate that cannot pass
        return GateResult(False, failures, cfg.primary_metric, "champion" if champion else "base", {}, [], False)
    losses = _losses(cfg, base, models, holdout, pairs)
    preds = _predictions(cfg, base, models, holdout + pairs, run_id, work_dir)
    return gate(cfg, holdout=holdout, pairs=pairs, predictions=preds, losses=losses, ask_judge=ask_judge)


__all__ = [
    "GateResult", "ModelScores", "add_row_metrics", "decide", "evaluate", "gate", "is_label_like", "label_metrics",
    "normalize", "score", "slice_keys", "task_metrics",
]  # fmt: skip
