"""Sticky, deterministic assignment; minimal movement on weight changes; the experiment repository."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from feedback.buckets import N_BUCKETS, initial_layout, moved_buckets, rebalance, target_counts
from feedback.experiments import Arm, Experiment, ExperimentError, ExperimentRepo, Guardrails, assign_arm

REPO = Path(__file__).resolve().parents[2]
USERS = [f"user-{i}" for i in range(20_000)]


def _exp(weights: dict[str, float], salt: str = "s1") -> Experiment:
    arms = [Arm(name=n, adapter=None if n == "control" else f"ad-{n}", weight=w) for n, w in weights.items()]
    return Experiment(id="e", alias="default", arms=arms, control="control", salt=salt, start="2025-01-01T00:00:00Z")


def test_assignment_is_deterministic_across_processes():
    exp = _exp({"control": 1, "lora": 1})
    here = [assign_arm(exp, u).name for u in USERS[:200]]
    assert here == [assign_arm(Experiment.model_validate_json(exp.model_dump_json()), u).name for u in USERS[:200]]
    code = (
        "import json,sys; from feedback.experiments import Experiment, assign_arm; "
        "e = Experiment.model_validate_json(sys.stdin.read()); "
        "print(json.dumps([assign_arm(e, f'user-{i}').name for i in range(200)]))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=exp.model_dump_json(),
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=REPO,
    ).stdout
    assert json.loads(out) == here
    assert len(set(here)) == 2


def test_weights_are_respected():
    exp = _exp({"control": 1, "a": 2, "b": 1})
    counts = Counter(assign_arm(exp, u).name for u in USERS)
    observed = [counts["control"], counts["a"], counts["b"]]
    expected = np.array([0.25, 0.5, 0.25]) * len(USERS)
    assert stats.chisquare(observed, expected).pvalue > 0.001
    rng = random.Random(7)
    anonymous = Counter(assign_arm(exp, None, rng).name for _ in range(20_000))
    assert stats.chisquare([anonymous["control"], anonymous["a"], anonymous["b"]], expected).pvalue > 0.001


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ({"control": 1, "lora": 1}, {"control": 4, "lora": 1}),
        ({"control": 1, "a": 1, "b": 1}, {"control": 2, "a": 1, "b": 1}),
        ({"control": 1, "a": 1, "b": 0}, {"control": 0.2, "a": 0.4, "b": 0.4}),
        ({"control": 1, "a": 1}, {"control": 1, "a": 1, "c": 2}),  # an arm is added
    ],
)
def test_weight_changes_move_the_fewest_users(old: dict[str, float], new: dict[str, float]):
    before = initial_layout(list(old), list(old.values()))
    after = rebalance(before, list(new), list(new.values()))
    old_counts = target_counts(list(old), list(old.values()))
    new_counts = target_counts(list(new), list(new.values()))
    minimum = sum(max(0, old_counts.get(n, 0) - new_counts.get(n, 0)) for n in set(old) | set(new))
    assert moved_buckets(before, after) == minimum  # no layout reaching the new counts moves fewer buckets
    assert {n: sum(b - a for a, b, arm in after if arm == n) for n in new} == new_counts
    # the users follow their buckets: only the minimum share changes arm, and only towards growing arms
    e_old, e_new = _exp(old), _exp(new).model_copy(update={"layout": after})
    moves = [(assign_arm(e_old, u).name, assign_arm(e_new, u).name) for u in USERS]
    moved = [(a, b) for a, b in moves if a != b]
    assert abs(len(moved) / len(USERS) - minimum / N_BUCKETS) < 0.02
    assert all(new_counts[b] > old_counts.get(b, 0) and new_counts.get(a, 0) < old_counts[a] for a, b in moved)
    # a layout built from scratch for the new weights would move more users (when the change is non-trivial)
    naive = initial_layout(list(new), list(new.values()))
    assert moved_buckets(before, naive) >= moved_buckets(before, after)


def test_repository_create_update_stop_and_visibility(tmp_path: Path):
    admin = ExperimentRepo(tmp_path)
    gateway = ExperimentRepo(tmp_path, refresh_s=0.05)
    assert gateway.active_for("default") is None
    exp = admin.create(
        "default",
        [Arm(name="control"), Arm(name="lora", adapter="ad1")],
        guardrails=Guardrails(p95_latency_ms_max=800),
        primary_metric="mean_score",
        actor="test",
    )
    time.sleep(0.06)
    seen = gateway.active_for("default")
    assert seen is not None and seen.id == exp.id and seen.primary_metric == "mean_score"
    with pytest.raises(ExperimentError, match="already running"):
        admin.create("default", [Arm(name="x")])
    with pytest.raises(ExperimentError, match="control arm"):
        admin.create("other", [Arm(name="x")], control="nope")

    users = {u: assign_arm(exp, u).name for u in USERS[:5000]}
    updated = admin.update(exp.id, weights={"lora": 3.0}, actor="test")
    assert updated.version == 2 and updated.arm("lora").weight == 3.0
    moved = [u for u in users if assign_arm(updated, u).name != users[u]]
    assert all(users[u] == "control" for u in moved)  # only control users move to the growing arm
    assert 0.15 < len(moved) / len(users) < 0.35  # 50 % -> 25 % control: a quarter of all users
    assert sorted(p.name for p in (tmp_path / "_experiments" / exp.id).iterdir()) == [
        "v000001.json",
        "v000002.json",
    ]

    stopped = admin.stop(exp.id)
    assert stopped.status == "stopped" and stopped.version == 3
    time.sleep(0.06)
    assert gateway.active_for("default") is None
    assert [e.id for e in ExperimentRepo(tmp_path).list(alias="default")] == [exp.id]
    assert ExperimentRepo(tmp_path).get(exp.id).status == "stopped"
    with pytest.raises(ExperimentError):
        admin.get("missing")
    second = admin.create("default", [Arm(name="control"), Arm(name="v2", adapter="ad2")])
    time.sleep(0.06)
    assert gateway.assign("default", "someone") is not None and second.is_active()


def test_concurrent_writers_cannot_overwrite_a_version(tmp_path: Path):
    repo = ExperimentRepo(tmp_path)
    exp = repo.create("default", [Arm(name="control"), Arm(name="b")])
    from feedback.fsutil import atomic_write_bytes

    target = tmp_path / "_experiments" / exp.id / "v000002.json"
    assert atomic_write_bytes(target, b"{}", exclusive=True)
    assert not atomic_write_bytes(target, b"{}", exclusive=True)  # second writer of version 2 loses
