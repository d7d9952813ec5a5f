"""The report on known data: per-arm numbers, SRM, guardrails, the decision, the plot."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.store_config import StoreConfig
from feedback.events import AdapterChangeEvent, FeedbackEvent
from feedback.experiments import Arm, Experiment, ExperimentError, ExperimentRepo, Guardrails
from feedback.plot import write_plot
from feedback.report import build_report
from feedback.store import EventStore
from tests.feedback.conftest import make_request

START = datetime.now(UTC) - timedelta(days=6)


def _experiment(root: Path, **kw: object) -> Experiment:
    return ExperimentRepo(root).create(
        "default",
        [Arm(name="control"), Arm(name="lora", adapter="ad1")],
        id="exp1",
        start=START,
        **kw,  # type: ignore[arg-type]
    )


def _populate(root: Path, plan: dict[str, dict[str, int]], *, kind: str = "thumbs") -> None:
    """plan[arm] = {"users", "requests_per_user", "up", "down", "errors", "slow"}: deterministic events."""
    with EventStore(StoreConfig(root=root), "gw") as store:
        store.submit(
            AdapterChangeEvent(
                ts=START + timedelta(hours=1),
                alias="default",
                adapter="ad1",
                previous=None,
                actor="promotion",
                reason="nightly",
            )
        )
        for arm, p in plan.items():
            rated = 0
            for u in range(p["users"]):
                for k in range(p.get("requests_per_user", 1)):
                    rid = f"{arm}-{u}-{k}"
                    ts = START + timedelta(minutes=(u * 31 + k) % (5 * 24 * 60))
                    error = rated < p.get("errors", 0) and k == 0
                    store.submit(
                        make_request(
                            rid,
                            ts=ts,
                            user=f"{arm}-u{u}",
                            experiment_id="exp1",
                            arm=arm,
                            status=500 if error else 200,
                            latency_ms=2000.0 if u < p.get("slow", 0) else 100.0 + u % 50,
                        )
                    )
                    if k == 0 and rated < p["up"] + p["down"]:
                        if kind == "thumbs":
                            value: object = rated < p["up"]
                        else:
                            value = 5.0 if rated < p["up"] else 2.0
                        store.write_feedback(FeedbackEvent(ts=ts, request_id=f"r{rid}", kind=kind, value=value))
                        rated += 1
        store.write_feedback(FeedbackEvent(request_id="r-unknown", kind="comment", value="lost?"))


def test_report_on_known_data(tmp_path: Path):
    _experiment(tmp_path)
    _populate(
        tmp_path,
        {
            "control": {"users": 400, "requests_per_user": 2, "up": 100, "down": 100},
            "lora": {"users": 400, "requests_per_user": 2, "up": 150, "down": 50},
        },
    )
    report = build_report(tmp_path, "exp1")
    arms = {a.name: a for a in report.arms}
    c, t = arms["control"], arms["lora"]
    assert (c.requests, c.users, t.requests, t.users) == (800, 400, 800, 400)
    assert (c.metric_n, c.metric, t.metric_n, t.metric) == (200, 0.5, 200, 0.75)
    assert c.feedback == {"thumbs": 200} and (t.thumbs_up, t.thumbs_down) == (150, 50)
    assert c.metric_ci == pytest.approx((0.4314, 0.5686), abs=1e-3)
    assert t.prob_beat is not None and t.prob_beat > 0.999 and t.expected_loss is not None and t.expected_loss < 1e-3
    assert t.p_value is not None and t.p_value < 0.01 and c.p_value is None
    assert t.p95_latency_ms == pytest.approx(100 + 47.0, abs=1.0)
    assert not report.srm.flagged
    assert report.winner == "lora" and report.decision.startswith("winner lora")
    assert report.pending_feedback == 1
    assert [ch["adapter"] for ch in report.adapter_changes] == ["ad1"]
    days = sorted({p.day for p in report.daily})
    assert len(days) >= 5 and [p.n for p in report.daily if p.arm == "lora"][-1] == 200
    table = report.to_table()
    assert "thumbs_up_rate" in table and "lora" in table and "winner lora" in table and "0.7500" in table
    png = write_plot(report, tmp_path / "out" / "report.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = write_plot(report, tmp_path / "out" / "report.html").read_text()
    assert "data:image/png;base64," in page and "winner lora" in page


def test_sample_ratio_mismatch_blocks_the_decision(tmp_path: Path):
    _experiment(tmp_path)
    _populate(
        tmp_path,
        {"control": {"users": 600, "up": 100, "down": 100}, "lora": {"users": 400, "up": 190, "down": 10}},
    )
    report = build_report(tmp_path, "exp1")
    assert report.srm.flagged and report.srm.p_value < 0.001
    assert report.winner is None and "sample ratio mismatch" in report.decision
    assert "MISMATCH" in report.to_table()


def test_guardrail_violation_blocks_a_winner(tmp_path: Path):
    _experiment(tmp_path, guardrails=Guardrails(error_rate_max=0.05, p95_latency_ms_max=1000))
    _populate(
        tmp_path,
        {
            "control": {"users": 300, "up": 100, "down": 100},
            "lora": {"users": 300, "up": 190, "down": 10, "errors": 40, "slow": 30},
        },
    )
    report = build_report(tmp_path, "exp1")
    lora = next(a for a in report.arms if a.name == "lora")
    assert lora.guardrails["error_rate"][2] is False and lora.guardrails["p95_latency_ms"][2] is False
    assert report.winner is None and "violate guardrails" in report.decision
    assert "VIOLATED" in report.to_table()


def test_aa_report_declares_no_winner_and_scores_use_the_normal_model(tmp_path: Path):
    _experiment(tmp_path, primary_metric="mean_score")
    _populate(
        tmp_path,
        {"control": {"users": 300, "up": 120, "down": 80}, "lora": {"users": 300, "up": 118, "down": 82}},
        kind="score",
    )
    report = build_report(tmp_path, "exp1")
    c, t = report.arms
    assert c.metric == pytest.approx(2 + 3 * 120 / 200) and t.metric == pytest.approx(2 + 3 * 118 / 200)
    assert t.prob_beat is not None and 0.2 < t.prob_beat < 0.8
    assert report.winner is None and report.decision.startswith("no winner yet")


def test_unknown_experiment(tmp_path: Path):
    with pytest.raises(ExperimentError):
        build_report(tmp_path, "nope")


def test_a_changed_vote_counts_once_with_its_latest_value(tmp_path: Path):
    _experiment(tmp_path)
    with EventStore(StoreConfig(root=tmp_path), "gw") as s:
        for i, arm in enumerate(["control", "lora", "lora"]):
            s.submit(make_request(i, experiment_id="exp1", arm=arm, ts=START + timedelta(hours=i)))
        s.write_feedback(FeedbackEvent(request_id="r0", kind="thumbs", value=True, ts=START + timedelta(hours=3)))
        s.write_feedback(FeedbackEvent(request_id="r1", kind="thumbs", value=True, ts=START + timedelta(hours=3)))
        s.write_feedback(FeedbackEvent(request_id="r1", kind="thumbs", value=False, ts=START + timedelta(hours=4)))
        s.write_feedback(FeedbackEvent(request_id="r2", kind="thumbs", value=True, ts=START + timedelta(hours=5)))
        s.write_feedback(FeedbackEvent(request_id="r2", kind="thumbs", value=True, source="automatic"))
    lora = next(a for a in build_report(tmp_path, "exp1").arms if a.name == "lora")
    assert (lora.metric_n, lora.thumbs_up, lora.thumbs_down, lora.metric) == (2, 1, 1, 0.5)
    assert lora.feedback == {"thumbs": 4}
