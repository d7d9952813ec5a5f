"""The gate's logic on crafted predictions: metrics, slices with intersections, per-slice regressions."""

from __future__ import annotations

from typing import Any

import pytest

from retrain.evaluate import decide, is_label_like, label_metrics, score, slice_keys
from retrain.recipe import EvalSection


def _rows() -> list[dict[str, Any]]:
    rows = []
    for i in range(40):
        label = "positive" if i % 2 == 0 else "negative"
        rows.append({"answer": label, "slices": {"label": label, "lang": "en" if i < 30 else "fr"}})
    return rows


def test_label_metrics_match_sklearn_definitions() -> None:
    refs = ["a", "a", "b", "b", "c"]
    preds = ["a", "b", "b", "b", "a"]
    m = label_metrics(refs, preds)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # per class precision a=1/2 b=2/3 c=0; recall a=1/2 b=1 c=0
    assert m["macro_precision"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert m["macro_recall"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0) / 3)
    assert is_label_like(["positive", "negative"]) and not is_label_like(["a long free text answer here"])


def test_slices_include_intersections() -> None:
    keys = slice_keys(_rows())
    assert len(keys["label=positive"]) == 20
    assert len(keys["lang=fr"]) == 10
    assert len(keys["label=negative&lang=fr"]) == 5
    assert set(slice_keys(_rows(), ["lang"])) == {"lang=en", "lang=fr"}


def test_gate_passes_on_improvement_and_fails_on_slice_regression() -> None:
    rows = _rows()
    cfg = EvalSection(min_slice_samples=5, slice_tolerance=0.05, min_improvement=0.0)
    truth = [r["answer"] for r in rows]
    reference = score("champion", rows, ["positive"] * 40, label_like=True)
    better = score("candidate", rows, truth, label_like=True)
    ok = decide(better, reference, cfg)
    assert ok.passed and ok.scores["candidate"].overall["exact_match"] == 1.0
    assert "PASSED" in ok.table()
    ok.notes.append("search: the best trial's validation loss 0.5000 ± 0.1000 (2 folds), mean ± sd over the folds")
    assert ok.table().endswith(
        "\n  search: the best trial's validation loss 0.5000 ± 0.1000 (2 folds), mean ± sd over the folds"
    )  # how a cross-validated search shows under the verdict

    # better overall (0.5 -> 0.75) but the label=positive slice drops from 1.0 to 0.5
    preds = [
        "negative" if r["slices"]["label"] == "negative" else ("positive" if i % 4 == 0 else "negative")
        for i, r in enumerate(rows)
    ]
    worse_slice = score("candidate", rows, preds, label_like=True)
    assert worse_slice.overall["exact_match"] == pytest.approx(0.75)
    bad = decide(worse_slice, reference, cfg)
    assert not bad.passed
    failing = {c["slice"] for c in bad.slice_checks if not c["ok"]}
    assert "label=positive" in failing and "label=positive&lang=en" in failing
    assert any("regressed" in r for r in bad.reasons) and "FAILED" in bad.table()

    # the same regression in a slice smaller than min_slice_samples is reported, not gated
    small = decide(worse_slice, reference, EvalSection(min_slice_samples=100))
    assert small.passed and all(not c["gated"] for c in small.slice_checks)

    # no improvement of the primary metric: fails
    same = decide(score("candidate", rows, ["positive"] * 40, label_like=True), reference, cfg)
    assert not same.passed and "does not beat" in same.reasons[0]
    need_more = decide(better, reference, EvalSection(min_improvement=0.6))
    assert not need_more.passed
