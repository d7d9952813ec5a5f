"""Stable splits: ratios, stability across nights, same prompt -> same split, k-fold."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from retrain.config import SplitConfig
from retrain.data.sources import normalize_rows
from retrain.data.splits import assign_splits, fold_rows


def rows(start: int, stop: int, kind: str = "sft") -> list[dict[str, Any]]:
    out = []
    for i in range(start, stop):
        base = {
            "row_id": f"{kind}{i}",
            "messages": [{"role": "user", "content": f"Question number {i}?"}],
            "request_id": f"req-{i}",
            "available_at": f"2026-01-01T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}",
        }
        answers = {"completion": f"Answer {i}."} if kind == "sft" else {"chosen": "good", "rejected": "bad"}
        out.append(base | answers)
    return normalize_rows(out, kind)[0]


def split_map(split_rows: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    return {r["row_id"]: name for name, rs in split_rows.items() for r in rs}


def test_ratios_on_5k_rows() -> None:
    by_split, notes = assign_splits(rows(0, 5000), SplitConfig(validation=0.1, holdout=0.15))
    assert notes["train"] + notes["validation"] + notes["holdout"] == 5000
    assert len(by_split["holdout"]) / 5000 == pytest.approx(0.15, abs=0.02)
    assert len(by_split["validation"]) / 5000 == pytest.approx(0.10, abs=0.02)
    assert all(r["split"] == name for name, rs in by_split.items() for r in rs)


@pytest.mark.parametrize("key", ["prompt", "request_id"])
def test_adding_rows_moves_no_old_row(key: str) -> None:
    cfg = SplitConfig(key=key)
    night1 = split_map(assign_splits(rows(0, 1000), cfg)[0])
    night2 = split_map(assign_splits(rows(0, 1000) + rows(1000, 3000), cfg)[0])
    assert all(night2[k] == v for k, v in night1.items())
    # the salt alone decides: another salt moves rows
    other = split_map(assign_splits(rows(0, 1000), SplitConfig(key=key, salt="other"))[0])
    assert sum(other[k] != v for k, v in night1.items()) > 50


@pytest.mark.parametrize("key", ["prompt", "request_id"])
def test_same_prompt_same_split(key: str) -> None:
    base = rows(0, 400)
    again = [
        {
            **r,
            "row_id": r["row_id"] + "-again",
            "request_id": r["request_id"] + "-later",
            "messages": [{"role": "user", "content": "  " + r["messages"][0]["content"].upper() + " "}],
            "available_at": "2026-02-01T00:00:00",
        }
        for r in base
    ]
    where = split_map(assign_splits(base + again, SplitConfig(key=key))[0])
    assert all(where[r["row_id"]] == where[r["row_id"] + "-again"] for r in base)
    # SFT rows and preference pairs with the same prompt share the split too
    pairs = split_map(assign_splits(rows(0, 400, "pairs"), SplitConfig(key=key))[0])
    assert all(pairs[f"pairs{i}"] == where[f"sft{i}"] for i in range(400))


def test_k_fold_over_train_and_validation() -> None:
    by_split, notes = assign_splits(rows(0, 2000), SplitConfig(folds=5))
    assert all("fold" not in r for r in by_split["holdout"])
    folded = by_split["train"] + by_split["validation"]
    counts = Counter(r["fold"] for r in folded)
    assert set(counts) == set(range(5)) and notes["folds"] == {k: counts[k] for k in range(5)}
    assert min(counts.values()) > 0.15 * len(folded)
    # a copy of a fold-2 row (augmented or re-sampled) trains nowhere and never evaluates
    source = next(r for r in by_split["train"] if r["fold"] == 2)
    by_split["train"].append({**source, "row_id": "copy", "augmented": True})
    train, evaluation = fold_rows(by_split, 2)
    assert {r["row_id"] for r in evaluation} == {r["row_id"] for r in folded if r["fold"] == 2}
    assert all(r["fold"] != 2 for r in train) and "copy" not in {r["row_id"] for r in train + evaluation}
    with pytest.raises(ValueError, match="folds"):
        fold_rows(assign_splits(rows(0, 10), SplitConfig())[0], 0)


def test_invalid_split_config() -> None:
    with pytest.raises(ValueError):
        SplitConfig(validation=0.6, holdout=0.5)
    with pytest.raises(ValueError):
        SplitConfig(folds=1)
