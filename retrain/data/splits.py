"""Stable train / validation / holdout splits and k-fold assignment.

bucket = first 8 bytes of sha256(salt + NUL + split key), mod 10 000. Buckets [0, holdout) go to
the holdout, [holdout, holdout + validation) to validation, the rest to train. The split key is
the sha256 of the normalised prompt (``key: prompt``, the default), so a prompt lands in the same
split every night whatever else is exported, SFT rows and pairs alike. With ``key: request_id`` it
is the request id of the earliest row (by available_at, row_id) having that normalised prompt in
this run — also stable unless an earlier row with the same prompt appears later (back-filled data).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

from retrain.config import SplitConfig
from retrain.data.dedupe import prompt_key

BUCKETS = 10_000
SPLITS = ("train", "validation", "holdout")


def stable_bucket(salt: str, key: str, buckets: int = BUCKETS) -> int:
    """A bucket in [0, buckets) that depends only on the salt and the key."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % buckets


def split_of_bucket(bucket: int, cfg: SplitConfig) -> str:
    """The split of a bucket under the configured ratios."""
    holdout = round(cfg.holdout * BUCKETS)
    if bucket < holdout:
        return "holdout"
    if bucket < holdout + round(cfg.validation * BUCKETS):
        return "validation"
    return "train"


def split_keys(rows: list[dict[str, Any]], cfg: SplitConfig) -> list[str]:
    """The split key of every row (rows with the same normalised prompt share it)."""
    prompts = [prompt_key(r) for r in rows]
    if cfg.key == "prompt":
        return prompts
    first: dict[str, str] = {}
    for i in sorted(range(len(rows)), key=lambda i: (rows[i].get("available_at") or "", rows[i]["row_id"])):
        first.setdefault(prompts[i], str(rows[i]["request_id"]))
    return [first[p] for p in prompts]


def assign_splits(
    rows: list[dict[str, Any]], cfg: SplitConfig
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Rows by split (each row gets ``split``, ``split_key`` and, with folds, ``fold``) and notes."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    for row, key in zip(rows, split_keys(rows, cfg), strict=True):
        split = split_of_bucket(stable_bucket(cfg.salt, key), cfg)
        row = {**row, "split": split, "split_key": key}
        if cfg.folds > 1 and split != "holdout":
            row["fold"] = stable_bucket(cfg.salt + ":fold", key, cfg.folds)
        out[split].append(row)
    notes: dict[str, Any] = {name: len(out[name]) for name in SPLITS}
    notes["key"] = cfg.key
    if cfg.folds > 1:
        folds = Counter(r["fold"] for name in ("train", "validation") for r in out[name])
        notes["folds"] = {k: folds[k] for k in range(cfg.folds)}
    return out, notes


def fold_rows(
    rows_by_split: dict[str, list[dict[str, Any]]], fold: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval) rows of one cross-validation fold over train + validation.

    Eval gets the original rows of the fold (never augmented rows or re-sampled copies); train gets
    every other row of train + validation. The holdout is not used.
    """
    train: list[dict[str, Any]] = []
    evaluation: list[dict[str, Any]] = []
    for name in ("train", "validation"):
        for row in rows_by_split.get(name, []):
            if "fold" not in row:
                raise ValueError("rows have no fold: set splits.folds >= 2")
            if row["fold"] != fold:
                train.append(row)
            elif not row.get("augmented") and not row.get("resampled"):
                evaluation.append(row)
    return train, evaluation


__all__ = ["BUCKETS", "SPLITS", "assign_splits", "fold_rows", "split_keys", "split_of_bucket", "stable_bucket"]
