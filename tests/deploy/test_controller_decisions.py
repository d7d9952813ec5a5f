"""`decide()` on recorded canary experiments: real event stores in tmp_path (WAL read by DuckDB), thumbs
drawn with numpy from known true rates, `build_report` → `decide`. No vLLM, no gateway.

The helpers (`record`, `ArmPlan`, `FakeFleet`) are shared with tests/deploy/test_cycle.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from core.deploy_config import CanaryGuardrails, PromotionConfig
from core.registry import Registry, RegistryConfig
from core.store_config import StoreConfig
from deploy.controller import Decision, PromotionController, decide
from feedback.events import AssignmentEvent, FeedbackEvent, RequestEvent
from feedback.experiments import Arm, ExperimentRepo
from feedback.reader import StoreReader
from feedback.report import Report, build_report
from feedback.store import EventStore

# yesterday at noon UTC: the canaries recorded below (the last few hours before NOW) then never straddle
# midnight, so a test's daily looks do not depend on the hour it runs at (see test_stats.py's xfail)
NOW = (datetime.now(UTC) - timedelta(days=1)).replace(hour=12, minute=0, second=0, microsecond=0)
EXP = "canary-x-v2"
ARMS = ("champion", "candidate")


@dataclass
class ArmPlan:
    """What one arm of a recorded canary saw: users (one request each unless said), rated requests and the
    true thumbs-up rate they are drawn from, the share of 5xx answers and the typical latency."""

    users: int
    rated: int
    p_up: float
    error_rate: float = 0.0
    latency_ms: float = 120.0
    requests_per_user: int = 1


@dataclass
class Written:
    """What was really written per arm (the figures must repeat it)."""

    requests: dict[str, int] = field(default_factory=dict)
    rated: dict[str, int] = field(default_factory=dict)
    up: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def metric(self, arm: str) -> float:
        return self.up[arm] / self.rated[arm]


def store_config(root: Path) -> StoreConfig:
    return StoreConfig(root=root, fsync=False, flush_interval_s=0.005)


def create_canary(
    root: Path,
    share: float = 0.5,
    *,
    start: datetime | None = None,
    exp_id: str = EXP,
    alias: str = "x",
) -> None:
    ExperimentRepo(root).create(
        alias,
        [Arm(name="champion", adapter=f"{alias}-v1", weight=round(1 - share, 6)),
         Arm(name="candidate", adapter=f"{alias}-v2", weight=share)],
        control="champion", id=exp_id, start=start or NOW - timedelta(hours=6), actor="test",
    )  # fmt: skip


def write_arm(
    store: EventStore,
    rng: np.random.Generator,
    arm: str,
    plan: ArmPlan,
    written: Written,
    *,
    exp_id: str = EXP,
    alias: str = "x",
    since: datetime,
    until: datetime,
    tag: str = "",
) -> None:
    """Assignments, requests and thumbs of one arm, with timestamps spread over [since, until)."""
    n = plan.users * plan.requests_per_user
    span_s = (until - since).total_seconds()
    offsets = np.sort(rng.uniform(0, span_s * 0.9, n))
    failed = set(rng.choice(n, round(n * plan.error_rate), replace=False).tolist()) if plan.error_rate else set()
    latency = plan.latency_ms * rng.lognormal(0.0, 0.2, n)
    thumbs = rng.random(plan.rated) < plan.p_up
    adapter = f"{alias}-v1" if arm == "champion" else f"{alias}-v2"
    rated = 0
    for i in range(n):
        u = i % plan.users
        user = f"{tag}{arm}-u{u}"
        ts = since + timedelta(seconds=float(offsets[i]))
        if i < plan.users:
            store.submit(AssignmentEvent(ts=ts, experiment_id=exp_id, alias=alias, arm=arm, user=user))
        rid = f"{exp_id}-{tag}{arm}-{i}"
        status = 500 if i in failed else 200
        store.submit(RequestEvent(
            ts=ts, request_id=rid, alias=alias, endpoint="chat", experiment_id=exp_id, arm=arm, adapter=adapter,
            user=user, completion="ok" if status == 200 else None, latency_ms=float(latency[i]), status=status,
            replica="gw-rec", finish_reason="stop" if status == 200 else None,
        ))  # fmt: skip
        if i < plan.rated:
            store.write_feedback(FeedbackEvent(ts=ts + timedelta(seconds=5), request_id=rid, kind="thumbs",
                                               value=bool(thumbs[i]), user=user))  # fmt: skip
            rated += 1
    written.requests[arm] = written.requests.get(arm, 0) + n
    written.rated[arm] = written.rated.get(arm, 0) + rated
    written.up[arm] = written.up.get(arm, 0) + int(thumbs.sum())
    written.errors[arm] = written.errors.get(arm, 0) + len(failed)


def record(
    root: Path,
    plans: dict[str, ArmPlan],
    *,
    share: float = 0.5,
    age_h: float = 6.0,
    seed: int = 0,
    exp_id: str = EXP,
    alias: str = "x",
    create: bool = True,
    written: Written | None = None,
    tag: str = "",
) -> Written:
    """Create the canary (unless `create` is False) and write what each arm saw into a real store."""
    start = NOW - timedelta(hours=age_h)
    if create:
        create_canary(root, share, start=start, exp_id=exp_id, alias=alias)
    rng = np.random.default_rng(seed)
    written = written or Written()
    with EventStore(store_config(root), "gw-rec", CollectorRegistry()) as store:
        for arm, plan in plans.items():
            write_arm(store, rng, arm, plan, written, exp_id=exp_id, alias=alias, since=start, until=NOW, tag=tag)
    return written


def report_and_decide(root: Path, cfg: PromotionConfig, exp_id: str = EXP) -> tuple[Report, Decision]:
    report = build_report(root, exp_id, alpha=cfg.alpha, now=NOW)
    return report, decide(report, cfg, NOW)


def assert_figures(decision: Decision, written: Written, share: float) -> None:
    """`figures` carries, per arm, what was written: requests, rated requests, the metric, errors."""
    f = decision.figures
    assert f["experiment"] == EXP and f["share"] == pytest.approx(share)
    assert f["srm_p_value"] is not None
    for arm in ARMS:
        a = f[arm]
        assert a["requests"] == written.requests[arm], (arm, a)
        assert a["rated"] == written.rated[arm], (arm, a)
        assert a["thumbs_up"] == written.up[arm] and a["thumbs_down"] == written.rated[arm] - written.up[arm]
        assert a["metric"] == pytest.approx(written.metric(arm), abs=1e-6), (arm, a)
        assert a["error_rate"] == pytest.approx(written.errors[arm] / written.requests[arm], abs=1e-6)
        assert a["p95_latency_ms"] is not None and a["p95_latency_ms"] > 0
    assert f["candidate"]["prob_beat_champion"] is not None and f["candidate"]["p_value"] is not None
    assert f["champion"]["prob_beat_champion"] is None  # the control is not compared with itself


CFG = PromotionConfig(min_samples=100, step_min_requests=50, max_duration_h=72)


# --- the scenarios --------------------------------------------------------------------------------------


def test_clear_win_promotes(tmp_path: Path) -> None:
    written = record(tmp_path, {"champion": ArmPlan(500, 400, 0.5), "candidate": ArmPlan(500, 400, 0.8)})
    report, d = report_and_decide(tmp_path, CFG)
    assert d.action == "promote", d
    assert report.winner == "candidate"
    assert d.figures["candidate"]["prob_beat_champion"] >= CFG.certainty
    assert d.figures["candidate"]["p_value"] < CFG.alpha
    assert written.metric("candidate") > written.metric("champion") + 0.2
    assert_figures(d, written, 0.5)


def test_clearly_worse_rolls_back(tmp_path: Path) -> None:
    written = record(tmp_path, {"champion": ArmPlan(500, 400, 0.6), "candidate": ArmPlan(500, 400, 0.35)})
    _, d = report_and_decide(tmp_path, CFG)
    assert d.action == "rollback" and "clearly worse" in d.reason, d
    assert 1 - d.figures["candidate"]["prob_beat_champion"] >= CFG.worse_certainty
    assert_figures(d, written, 0.5)


@pytest.mark.parametrize(
    ("plan", "cfg", "breach"),
    [
        (ArmPlan(500, 400, 0.8, error_rate=0.2), CFG, "error rate 0.200"),
        (
            ArmPlan(500, 400, 0.8, latency_ms=3000.0),
            CFG.model_copy(update={"guardrails": CanaryGuardrails(p95_latency_ms_max=1000.0)}),
            "p95 latency",
        ),
        (
            ArmPlan(500, 400, 0.8),
            CFG.model_copy(update={"guardrails": CanaryGuardrails(negative_feedback_rate_max=0.1)}),
            "negative feedback",
        ),
    ],
    ids=["error-rate", "p95-latency", "negative-feedback"],
)
def test_guardrail_breach_rolls_back_despite_a_better_metric(
    tmp_path: Path, plan: ArmPlan, cfg: PromotionConfig, breach: str
) -> None:
    written = record(tmp_path, {"champion": ArmPlan(500, 400, 0.5), "candidate": plan})
    _, d = report_and_decide(tmp_path, cfg)
    assert d.action == "rollback" and d.reason.startswith("guardrail breach") and breach in d.reason, d
    assert written.metric("candidate") > written.metric("champion") + 0.2  # it would have won on the metric
    assert d.figures["candidate"]["prob_beat_champion"] > 0.99
    assert_figures(d, written, 0.5)
    if breach == "p95 latency":
        assert d.figures["candidate"]["p95_latency_ms"] > 1000 > d.figures["champion"]["p95_latency_ms"]


def test_guardrails_wait_for_min_requests(tmp_path: Path) -> None:
    """Three failed requests out of ten are not judged yet (guardrails.min_requests = 20)."""
    written = record(tmp_path, {"champion": ArmPlan(10, 5, 0.5), "candidate": ArmPlan(10, 5, 0.5, error_rate=0.3)})
    _, d = report_and_decide(tmp_path, CFG)
    assert d.action == "continue", d
    assert d.figures["candidate"]["error_rate"] == pytest.approx(0.3)
    assert_figures(d, written, 0.5)


def test_sample_ratio_mismatch_pauses(tmp_path: Path) -> None:
    """70/30 users on a 50/50 canary: the logging or the assignment is broken, nothing is decided — not even
    the promotion the metric would justify."""
    written = record(tmp_path, {"champion": ArmPlan(700, 300, 0.5), "candidate": ArmPlan(300, 300, 0.8)})
    report, d = report_and_decide(tmp_path, CFG)
    assert d.action == "pause" and "sample ratio mismatch" in d.reason, d
    assert report.srm.flagged and d.figures["srm_p_value"] < 0.001
    assert report.srm.observed == {"champion": 700, "candidate": 300}
    assert_figures(d, written, 0.5)
    with StoreReader(tmp_path).connect() as con:  # the gateway's exposure log agrees: 700 / 300
        rows = dict(con.execute('SELECT arm, count(DISTINCT "user") FROM assignments GROUP BY arm').fetchall())
    assert rows == {"champion": 700, "candidate": 300}


def test_no_difference_past_max_duration_times_out(tmp_path: Path) -> None:
    written = record(tmp_path, {"champion": ArmPlan(300, 200, 0.5), "candidate": ArmPlan(300, 200, 0.5)}, age_h=80)
    report, d = report_and_decide(tmp_path, CFG)
    assert d.action == "timeout" and "80.0 h" in d.reason, d
    assert report.winner is None and d.figures["candidate"]["p_value"] >= CFG.alpha
    assert_figures(d, written, 0.5)


def test_no_difference_young_continues(tmp_path: Path) -> None:
    written = record(tmp_path, {"champion": ArmPlan(300, 200, 0.5), "candidate": ArmPlan(300, 200, 0.5)}, age_h=5)
    report, d = report_and_decide(tmp_path, CFG)
    assert d.action == "continue" and d.next_share is None, d  # 50 % is the last ramp step
    assert report.winner is None
    assert_figures(d, written, 0.5)


def test_ramp_step(tmp_path: Path) -> None:
    """At 10 %, with enough candidate requests, guardrails intact and no winner yet: go to 50 %."""
    written = record(tmp_path, {"champion": ArmPlan(540, 120, 0.5), "candidate": ArmPlan(60, 40, 0.55)}, share=0.1)
    report, d = report_and_decide(tmp_path, CFG)
    assert d.action == "ramp" and d.next_share == 0.5, d
    assert report.winner is None and not report.srm.flagged
    assert d.figures["candidate"]["requests"] >= CFG.step_min_requests
    assert_figures(d, written, 0.1)


def test_ramp_waits_for_step_min_requests(tmp_path: Path) -> None:
    written = record(tmp_path, {"champion": ArmPlan(270, 60, 0.5), "candidate": ArmPlan(30, 20, 0.5)}, share=0.1)
    _, d = report_and_decide(tmp_path, CFG)
    assert d.action == "continue" and d.figures["candidate"]["requests"] == 30, d
    assert_figures(d, written, 0.1)


@pytest.mark.parametrize("min_samples", [100, 1])
def test_few_samples_with_a_big_lift_do_not_promote(tmp_path: Path, min_samples: int) -> None:
    """10 of 12 up against 1 of 12: a lift of 75 points observed, but far too little evidence — neither the
    sample minimum nor (with min_samples 1) the always-valid test lets it through."""
    written = record(tmp_path, {"champion": ArmPlan(12, 12, 0.25), "candidate": ArmPlan(12, 12, 0.75)}, seed=0)
    lift = written.metric("candidate") - written.metric("champion")
    assert lift >= 0.5, written
    _, d = report_and_decide(tmp_path, CFG.model_copy(update={"min_samples": min_samples}))
    assert d.action != "promote", d
    assert d.action == "continue"
    assert_figures(d, written, 0.5)


def test_unanimous_feedback_promotes(tmp_path: Path) -> None:
    written = record(tmp_path, {"champion": ArmPlan(300, 200, 0.0), "candidate": ArmPlan(300, 200, 1.0)})
    _, d = report_and_decide(tmp_path, CFG)
    assert_figures(d, written, 0.5)
    assert d.figures["candidate"]["prob_beat_champion"] == 1.0
    assert d.action == "promote", d


# --- A/A: no-difference canaries looked at daily ---------------------------------------------------------


def test_aa_canaries_looked_at_daily_rarely_promote(tmp_path: Path) -> None:
    """30 canaries without a difference (both arms 0.6), evaluated once a day for 7 days on the cumulative data
    (one store, each day's events appended before that day's look): at most 2 are promoted."""
    canaries, days, per_day = 30, 7, 40
    cfg = PromotionConfig(ramp=[0.5], min_samples=100, max_duration_h=24 * (days + 1))
    start = NOW - timedelta(days=days)
    ids = [f"canary-aa{i:02d}-v2" for i in range(canaries)]
    for i, exp_id in enumerate(ids):
        create_canary(tmp_path, 0.5, start=start, exp_id=exp_id, alias=f"aa{i:02d}")
    rng = np.random.default_rng(20240611)
    outcome: dict[str, tuple[int, str]] = {}
    looks = 0
    plan = ArmPlan(per_day, per_day, 0.6)
    with EventStore(store_config(tmp_path), "gw-aa", CollectorRegistry()) as store:
        for day in range(days):
            since, until = start + timedelta(days=day), start + timedelta(days=day + 1)
            for i, exp_id in enumerate(ids):
                for arm in ARMS:
                    write_arm(store, rng, arm, plan, Written(), exp_id=exp_id, alias=f"aa{i:02d}", since=since,
                              until=until, tag=f"d{day}-")  # fmt: skip
            store.flush()
            con = StoreReader(tmp_path).connect()
            try:
                for exp_id in ids:
                    if exp_id in outcome:
                        continue  # promoted or rolled back: that canary is over
                    report = build_report(tmp_path, exp_id, con=con, now=until)
                    d = decide(report, cfg, until)
                    looks += 1
                    assert d.figures["candidate"]["rated"] == d.figures["champion"]["rated"] == per_day * (day + 1)
                    assert d.action in ("promote", "rollback", "continue"), d
                    if d.action in ("promote", "rollback"):
                        outcome[exp_id] = (day, d.action)
            finally:
                con.close()
    promoted = [k for k, (_, action) in outcome.items() if action == "promote"]
    assert looks >= canaries * days - 6 * len(outcome)
    assert len(promoted) <= 2, outcome


# --- the controller applying decisions (a fake fleet: no gateway) ------------------------------------------


class FakeFleet:
    """GatewayFleet's interface over the store's experiments and an in-memory alias table; records calls."""

    def __init__(self, store_root: Path, aliases: dict[str, str | None] | None = None) -> None:
        self.repo = ExperimentRepo(store_root, refresh_s=0)
        self.aliases: dict[str, str | None] = dict(aliases or {})
        self.adapters: dict[str, str] = {}
        self.calls: list[tuple[str, Any]] = []
        self.urls = ["http://fake-gateway"]

    def close(self) -> None:
        pass

    def register_adapter(self, name: str, path: str) -> None:
        self.calls.append(("register_adapter", name))
        self.adapters[name] = path

    def point(self, alias: str, adapter: str | None) -> None:
        self.calls.append(("point", (alias, adapter)))
        self.aliases[alias] = adapter

    def alias_targets(self, alias: str) -> dict[str, str | None]:
        return {self.urls[0]: self.aliases.get(alias)}

    def create_experiment(self, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("create_experiment", body["id"]))
        exp = self.repo.create(body["alias"], [Arm(**a) for a in body["arms"]], body.get("control"), id=body["id"],
                               description=body.get("description", ""), actor="fake-fleet")  # fmt: skip
        return exp.model_dump(mode="json")

    def update_experiment(self, experiment_id: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("update_experiment", (experiment_id, body)))
        return self.repo.update(experiment_id, weights=body.get("weights"), actor="fake-fleet").model_dump(mode="json")

    def stop_experiment(self, experiment_id: str) -> None:
        self.calls.append(("stop_experiment", experiment_id))
        self.repo.stop(experiment_id, actor="fake-fleet")


def registry_with_champion(tmp_path: Path, alias: str = "x") -> Registry:
    """`<alias>-v1` champion, `<alias>-v2` candidate (adapter directories need not exist for the fake fleet)."""
    reg = Registry(RegistryConfig(path=tmp_path / "registry.duckdb", adapter_root=tmp_path / "adapters"))
    for n in (1, 2):
        reg.register_candidate(alias, tmp_path / "adapters" / f"{alias}-v{n}", base_model="tiny")
    reg.transition(f"{alias}-v1", "champion", actor="test", reason="first champion")
    return reg


def start_x_canary(tmp_path: Path, cfg: PromotionConfig = CFG) -> tuple[Path, Registry, FakeFleet, PromotionController]:
    root = tmp_path / "events"
    reg = registry_with_champion(tmp_path)
    fleet = FakeFleet(root, {"x": "x-v1"})
    ctl = PromotionController(reg, fleet, root, cfg)  # type: ignore[arg-type]
    exp = ctl.start_canary("x-v2")
    assert exp.id == EXP and exp.status == "running" and exp.arm("champion").adapter == "x-v1"
    assert exp.arm("candidate").adapter == "x-v2" and exp.arm("candidate").weight == pytest.approx(cfg.ramp[0])
    assert reg.get("x-v2").status == "canary"
    return root, reg, fleet, ctl


def test_controller_ramp_changes_weights_and_audits(tmp_path: Path) -> None:
    root, reg, fleet, ctl = start_x_canary(tmp_path)
    record(root, {"champion": ArmPlan(540, 100, 0.5), "candidate": ArmPlan(60, 40, 0.55)}, create=False)
    d = ctl.evaluate("x", now=NOW)
    assert d is not None and d.action == "ramp" and d.next_share == 0.5, d
    exp = ExperimentRepo(root).get(EXP)
    assert exp.status == "running" and exp.arm("candidate").weight == pytest.approx(0.5)
    assert exp.arm("champion").weight == pytest.approx(0.5)
    ramp = reg.audit("x")[-1]
    assert ramp["from_status"] == ramp["to_status"] == "canary" and ramp["reason"].startswith("ramp to 50%")
    assert ramp["figures"]["candidate"]["requests"] == 60 and ramp["figures"]["share"] == pytest.approx(0.1)
    assert reg.get("x-v2").status == "canary" and fleet.aliases["x"] == "x-v1"


def test_ramped_canary_with_a_clear_win_promotes(tmp_path: Path) -> None:
    """start_canary at 10 % → ramp to 50 % → a clear win in the 50 % phase promotes."""
    root, reg, fleet, ctl = start_x_canary(tmp_path)
    written = record(root, {"champion": ArmPlan(540, 100, 0.5), "candidate": ArmPlan(60, 40, 0.55)}, create=False)
    d = ctl.evaluate("x", now=NOW)
    assert d is not None and d.action == "ramp", d
    record(root, {"champion": ArmPlan(500, 400, 0.5), "candidate": ArmPlan(500, 400, 0.8)}, create=False,
           written=written, seed=1, tag="p2-")  # fmt: skip
    d = ctl.evaluate("x", now=NOW)
    assert d is not None and d.action == "promote", d
    assert reg.get("x-v2").status == "champion" and reg.get("x-v1").status == "retired"
    assert fleet.aliases["x"] == "x-v2"


def test_controller_rollback_decision_rejects_and_keeps_the_champion(tmp_path: Path) -> None:
    root, reg, fleet, ctl = start_x_canary(tmp_path, CFG.model_copy(update={"ramp": [0.5]}))
    record(root, {"champion": ArmPlan(500, 400, 0.6), "candidate": ArmPlan(500, 400, 0.35)}, create=False)
    d = ctl.evaluate("x", now=NOW)
    assert d is not None and d.action == "rollback", d
    assert reg.get("x-v2").status == "rejected" and reg.get("x-v1").status == "champion"
    assert ExperimentRepo(root).get(EXP).status == "stopped"
    assert fleet.aliases["x"] == "x-v1" and ("point", ("x", "x-v2")) not in fleet.calls
    last = reg.audit("x")[-1]
    assert last["to_status"] == "rejected" and last["figures"]["candidate"]["rated"] == 400
    assert ctl.evaluate("x", now=NOW) is None  # nothing running any more


def test_operator_rollback_during_a_canary_keeps_the_champion(tmp_path: Path) -> None:
    root, reg, fleet, ctl = start_x_canary(tmp_path)
    ctl.rollback("x", reason="candidate misbehaves")
    assert ExperimentRepo(root).get(EXP).status == "stopped"
    assert reg.get("x-v2").status == "rejected"
    assert reg.get("x-v1").status == "champion" and fleet.aliases["x"] == "x-v1"
