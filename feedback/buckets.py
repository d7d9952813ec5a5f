"""Sticky assignment: users hash into a fixed set of buckets, and a layout maps bucket ranges to arms.

When weights change, :func:`rebalance` moves only as many buckets as the new weights require:
arms that must shrink give up their highest-numbered buckets, and arms that must grow take the
freed buckets in ascending order. Every other bucket keeps its arm, so the number of users who
change arm is the minimum possible (the total-variation distance between the old and new
weight vectors, times the number of users).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

N_BUCKETS = 10_000

Layout = list[tuple[int, int, str]]  # [start, stop, arm) ranges covering 0..N_BUCKETS


def bucket_of(salt: str, user: str) -> int:
    """The user's bucket: a stable hash of (salt, user) — identical in every process and version."""
    digest = hashlib.blake2b(f"{salt}\x00{user}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % N_BUCKETS


def target_counts(names: Sequence[str], weights: Sequence[float]) -> dict[str, int]:
    """Buckets per arm proportional to the weights (largest remainder; ties go to the earlier arm)."""
    total = float(sum(weights))
    if total <= 0 or any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError("arm weights must be finite, non-negative and not all zero")
    quotas = [w / total * N_BUCKETS for w in weights]
    counts = [math.floor(q) for q in quotas]
    rest = N_BUCKETS - sum(counts)
    order = sorted(range(len(names)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:rest]:
        counts[i] += 1
    return dict(zip(names, counts, strict=True))


def _to_owner(layout: Layout, names: list[str]) -> np.ndarray:
    owner = np.full(N_BUCKETS, -1, dtype=np.int64)
    index = {n: i for i, n in enumerate(names)}
    for start, stop, arm in layout:
        owner[start:stop] = index.get(arm, -1)
    return owner


def _to_layout(owner: np.ndarray, names: list[str]) -> Layout:
    cuts = np.flatnonzero(np.diff(owner)) + 1
    starts = np.concatenate(([0], cuts))
    stops = np.concatenate((cuts, [N_BUCKETS]))
    return [(int(a), int(b), names[int(owner[a])]) for a, b in zip(starts, stops, strict=True)]


def initial_layout(names: Sequence[str], weights: Sequence[float]) -> Layout:
    """Contiguous ranges in arm order."""
    return rebalance([], names, weights)


def rebalance(layout: Layout, names: Sequence[str], weights: Sequence[float]) -> Layout:
    """A layout for the new weights that moves the fewest buckets away from ``layout``."""
    names = list(names)
    targets = target_counts(names, weights)
    owner = _to_owner(layout, names)  # buckets of removed arms become free (-1)
    for i, name in enumerate(names):
        mine = np.flatnonzero(owner == i)
        surplus = len(mine) - targets[name]
        if surplus > 0:
            owner[mine[-surplus:]] = -1
    free = np.flatnonzero(owner == -1)
    pos = 0
    for i, name in enumerate(names):
        need = targets[name] - int(np.count_nonzero(owner == i))
        if need > 0:
            owner[free[pos : pos + need]] = i
            pos += need
    return _to_layout(owner, names)


def moved_buckets(old: Layout, new: Layout) -> int:
    """How many buckets changed arm between two layouts."""
    names = sorted({a for _, _, a in old} | {a for _, _, a in new})
    return int(np.count_nonzero(_to_owner(old, names) != _to_owner(new, names)))


def arm_at(layout: Layout, bucket: int) -> str:
    """The arm owning ``bucket``."""
    lo, hi = 0, len(layout) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if layout[mid][0] <= bucket:
            lo = mid
        else:
            hi = mid - 1
    return layout[lo][2]
