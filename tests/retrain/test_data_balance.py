"""Balancing a 90/10 label attribute: re-sampling (up, down, capped) and loss weights."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from retrain.config import BalanceConfig
from retrain.data.balance import attribute_value, balance_rows


def rows_90_10(n: int = 100) -> list[dict[str, Any]]:
    return [{"row_id": f"r{i:03d}", "metadata": {"label": "neg" if i % 10 == 0 else "pos"}} for i in range(n)]


def labels(rows: list[dict[str, Any]]) -> Counter[str]:
    return Counter(r["metadata"]["label"] for r in rows)


def test_resample_up_uniform() -> None:
    out, dropped, notes = balance_rows(rows_90_10(), BalanceConfig(attribute="label", mode="resample"), seed=0)
    assert labels(out) == {"pos": 90, "neg": 90}
    assert dict(dropped) == {}
    copies = [r for r in out if r.get("resampled")]
    assert len(copies) == 80 and all(r["metadata"]["label"] == "neg" for r in copies)
    assert len({r["row_id"] for r in out}) == len(out)  # copies get their own ids
    assert notes["before"] == {"neg": 10, "pos": 90} and notes["after"] == {"neg": 90, "pos": 90}


def test_resample_down_and_capped() -> None:
    out, dropped, _ = balance_rows(
        rows_90_10(), BalanceConfig(attribute="label", mode="resample", direction="down"), seed=0
    )
    assert labels(out) == {"pos": 10, "neg": 10} and dict(dropped) == {"downsampled": 80}
    assert not any(r.get("resampled") for r in out)
    capped = BalanceConfig(attribute="label", mode="resample", target="capped", max_ratio=3, direction="down")
    out, dropped, _ = balance_rows(rows_90_10(), capped, seed=0)
    assert labels(out) == {"pos": 30, "neg": 10} and dict(dropped) == {"downsampled": 60}
    up = BalanceConfig(attribute="label", mode="resample", target="capped", max_ratio=3)
    assert labels(balance_rows(rows_90_10(), up, seed=0)[0]) == {"pos": 90, "neg": 30}
    limited = BalanceConfig(attribute="label", mode="resample", max_factor=4)
    assert labels(balance_rows(rows_90_10(), limited, seed=0)[0]) == {"pos": 90, "neg": 40}


def test_weights_mode_mean_one() -> None:
    rows = rows_90_10()
    out, _, notes = balance_rows(rows, BalanceConfig(attribute="label", mode="weights"), seed=0)
    assert len(out) == len(rows)
    weights = [r["weight"] for r in out]
    assert sum(weights) / len(weights) == pytest.approx(1.0)
    by_label = {r["metadata"]["label"]: r["weight"] for r in out}
    assert by_label["neg"] / by_label["pos"] == pytest.approx(9.0)
    # each class carries the same total weight
    assert sum(w for r, w in zip(out, weights, strict=True) if r["metadata"]["label"] == "neg") == pytest.approx(50)
    assert notes["weights"] == {"neg": 5.0, "pos": 0.5556}


def test_deterministic_with_the_seed() -> None:
    cfg = BalanceConfig(attribute="label", mode="resample", direction="down")

    def kept(rows: list[dict[str, Any]], seed: int) -> list[str]:
        return [r["row_id"] for r in balance_rows(rows, cfg, seed=seed)[0]]

    ids = kept(rows_90_10(), 1)
    assert ids == kept(rows_90_10(), 1)
    assert sorted(kept(list(reversed(rows_90_10())), 1)) == sorted(ids)  # the choice depends on row ids only
    assert ids != kept(rows_90_10(), 2)


def test_attribute_lookup_and_off_switch() -> None:
    row = {"alias": "support", "metadata": {"task": "qa", "tags": ["b", "a"]}, "labels": ["urgent"], "lang": "fr"}
    assert attribute_value(row, "alias") == "support"
    assert attribute_value(row, "task") == "qa"
    assert attribute_value(row, "tags") == "a,b"
    assert attribute_value(row, "label") == "urgent"
    assert attribute_value(row, "lang") == "fr"
    assert attribute_value(row, "slice", "n/a") == "n/a"
    rows = rows_90_10(10)
    assert balance_rows(rows, BalanceConfig(), seed=0)[0] == rows
