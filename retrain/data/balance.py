"""Balancing the training split across one attribute, by re-sampling or by loss weights.

Target size of every value (class) c with n_c rows, r = 1 (uniform) or ``max_ratio`` (capped):
``up``: t_c = max(n_c, n_max / r); ``down``: t_c = min(n_c, r * n_min); never above
``max_factor * n_c``. ``resample`` copies rows (copies are marked ``resampled: True``) or drops
them; ``weights`` keeps the rows and sets ``weight`` ∝ t_c / n_c, scaled to a mean of 1.0. Which
rows are copied or dropped depends only on sha256(seed, row_id): deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from typing import Any

from retrain.config import BalanceConfig

TOP_LEVEL = ("alias", "adapter", "arm", "experiment_id", "endpoint", "origin")


def _text(value: Any) -> str | None:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, list | tuple):
        return ",".join(sorted(str(v) for v in value))
    return str(value)


def attribute_value(row: dict[str, Any], key: str, missing: str = "unknown") -> str:
    """A row's value of a slice attribute: export columns (alias, arm, ...), then metadata, then (for
    ``label``) the row's ``labels`` joined with commas, then any other top-level field; else ``missing``."""
    candidates: list[Any] = []
    if key in TOP_LEVEL:
        candidates.append(row.get(key))
    candidates.append((row.get("metadata") or {}).get(key))
    if key in ("label", "labels"):
        candidates.append(row.get("labels"))
    candidates.append(row.get(key))
    for value in candidates:
        text = _text(value)
        if text is not None:
            return text
    return missing


def _rank(seed: int, row: dict[str, Any], salt: str = "") -> bytes:
    return hashlib.sha256(f"{seed}\x00{salt}\x00{row['row_id']}".encode()).digest()


def target_sizes(counts: dict[str, int], cfg: BalanceConfig) -> dict[str, float]:
    """Target number of rows per value (see the module docs)."""
    ratio = 1.0 if cfg.target == "uniform" else cfg.max_ratio
    n_min, n_max = min(counts.values()), max(counts.values())
    out = {}
    for value, n in counts.items():
        t = max(n, n_max / ratio) if cfg.direction == "up" else min(n, n_min * ratio)
        out[value] = min(t, n * cfg.max_factor)
    return out


def balance_rows(
    rows: list[dict[str, Any]], cfg: BalanceConfig, *, seed: int, missing: str = "unknown"
) -> tuple[list[dict[str, Any]], Counter[str], dict[str, Any]]:
    """Balanced rows, drop counts (`downsampled`) and notes (sizes before / after, weights)."""
    dropped: Counter[str] = Counter()
    if not cfg.attribute or not rows:
        return list(rows), dropped, {"enabled": False}
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[attribute_value(row, cfg.attribute, missing)].append(row)
    counts = {value: len(members) for value, members in sorted(groups.items())}
    notes: dict[str, Any] = {"attribute": cfg.attribute, "mode": cfg.mode, "before": counts}
    targets = target_sizes(counts, cfg)
    if cfg.mode == "weights":
        total = sum(targets.values())
        weights = {v: targets[v] / counts[v] * len(rows) / total for v in counts}
        notes["weights"] = {v: round(w, 4) for v, w in weights.items()}
        out = [{**r, "weight": weights[attribute_value(r, cfg.attribute, missing)]} for r in rows]
        return out, dropped, notes
    keep: set[str] = set()
    copies: list[dict[str, Any]] = []
    for value, members in groups.items():
        want = round(targets[value])
        ordered = sorted(members, key=lambda r: _rank(seed, r))
        if want <= len(members):
            keep.update(r["row_id"] for r in ordered[:want])
            if want < len(members):
                dropped["downsampled"] += len(members) - want
            continue
        keep.update(r["row_id"] for r in members)
        extra = want - len(members)
        for j in range(math.ceil(extra / len(members))):
            batch = ordered[: min(len(members), extra - j * len(members))]
            copies.extend({**r, "row_id": f"{r['row_id']}#copy{j + 1}", "resampled": True} for r in batch)
    out = [r for r in rows if r["row_id"] in keep] + sorted(copies, key=lambda r: r["row_id"])
    notes["after"] = dict(sorted(Counter(attribute_value(r, cfg.attribute, missing) for r in out).items()))
    return out, dropped, notes


__all__ = ["attribute_value", "balance_rows", "target_sizes"]
