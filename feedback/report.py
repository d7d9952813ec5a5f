"""The A/B report of one experiment: per-arm table, Bayesian and sequential comparisons, SRM and
guardrail checks. ``build_report(root, experiment_id)`` reads the store; ``Report.to_table()``
renders plain text; feedback/plot.py draws it.

Units: the primary metric is computed per rated request (a user who changes a thumbs vote
counts once, with the latest vote); feedback with source ``automatic`` is excluded. Errors are
responses with status >= 500. Users (for SRM) are distinct users plus requests without a user.
A winner is declared only by the always-valid sequential test (alpha split over the non-control
arms), when the SRM check passes and the arm violates no guardrail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from feedback import stats
from feedback.experiments import Experiment, ExperimentRepo
from feedback.reader import StoreReader

_DAY_US = 86_400_000_000

# Ratings per arm, kind and day (of the first rating): one per request, the latest vote. Requests
# rated once (nearly all) skip the per-request grouping; the few rated several times (found by
# their 64-bit id hash) are grouped exactly by request_id.
_RATED_FILTER = "experiment_id = $e AND kind IN ('thumbs', 'score') AND source <> 'automatic' AND value_num IS NOT NULL"
_RATED_SQL = f"""
WITH f AS (SELECT arm, kind, _rh, value_num AS v, ts FROM feedback WHERE {_RATED_FILTER}),
multi AS (SELECT _rh FROM f GROUP BY _rh HAVING count(*) > 1),
rated AS (
    SELECT arm, kind, v, ts AS first FROM f WHERE _rh NOT IN (SELECT _rh FROM multi)
    UNION ALL
    SELECT arm, kind, arg_max(value_num, ts), min(ts) FROM feedback
    WHERE {_RATED_FILTER} AND _rh IN (SELECT _rh FROM multi)
    GROUP BY arm, kind, request_id
)
SELECT arm, kind, epoch_us(first) // {_DAY_US} AS day, count(*), sum(v), sum(v * v)
FROM rated GROUP BY ALL ORDER BY day
"""


@dataclass
class ArmReport:
    """Everything the report knows about one arm."""

    name: str
    adapter: str | None
    weight: float
    requests: int = 0
    users: int = 0
    units: int = 0
    error_rate: float = float("nan")
    p95_latency_ms: float = float("nan")
    feedback: dict[str, int] = field(default_factory=dict)
    thumbs_up: int = 0
    thumbs_down: int = 0
    metric_n: int = 0
    metric: float = float("nan")
    metric_ci: tuple[float, float] = (float("nan"), float("nan"))
    metric_var: float = float("nan")
    prob_beat: float | None = None
    expected_loss: float | None = None
    p_value: float | None = None
    guardrails: dict[str, tuple[float | None, float | None, bool | None]] = field(default_factory=dict)

    @property
    def negative_rate(self) -> float:
        """Share of thumbs-rated requests rated down."""
        rated = self.thumbs_up + self.thumbs_down
        return self.thumbs_down / rated if rated else float("nan")

    @property
    def guardrails_ok(self) -> bool:
        """No guardrail is violated (missing data counts as not violated)."""
        return all(ok is not False for _, _, ok in self.guardrails.values())


@dataclass
class DailyPoint:
    """Cumulative state of one arm at the end of one day (one "look")."""

    day: date
    arm: str
    n: int
    metric: float
    ci: tuple[float, float]
    p_value: float | None


@dataclass
class Report:
    """The report of one experiment; see the module docs for definitions."""

    experiment: Experiment
    generated_at: datetime
    arms: list[ArmReport]
    srm: stats.SRMResult
    daily: list[DailyPoint]
    winner: str | None
    decision: str
    alpha: float
    pending_feedback: int
    adapter_changes: list[dict[str, Any]]
    diff_samples: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_table(self) -> str:
        """Plain-text rendering (fixed-width table plus checks and decision)."""
        exp = self.experiment
        metric = exp.primary_metric
        lines = [
            f"experiment {exp.id} on alias {exp.alias!r} ({exp.status}, v{exp.version}); "
            f"primary metric {metric}; control {exp.control}",
            f"window {exp.start:%Y-%m-%d %H:%M} .. {f'{exp.end:%Y-%m-%d %H:%M}' if exp.end else 'open'} UTC; "
            f"report at {self.generated_at:%Y-%m-%d %H:%M:%S} UTC",
            "",
        ]
        header = [
            "arm",
            "adapter",
            "weight",
            "requests",
            "users",
            "rated",
            metric,
            "95% CI",
            "P(beat ctl)",
            "exp. loss",
            "p (seq.)",
            "err rate",
            "p95 ms",
            "neg rate",
            "guardrails",
        ]
        rows = [header]
        for a in self.arms:
            rows.append(
                [
                    a.name + (" *" if a.name == exp.control else ""),
                    a.adapter or "(base)",
                    f"{a.weight:g}",
                    str(a.requests),
                    str(a.users),
                    str(a.metric_n),
                    _fmt(a.metric),
                    f"[{_fmt(a.metric_ci[0])}, {_fmt(a.metric_ci[1])}]",
                    _fmt(a.prob_beat),
                    _fmt(a.expected_loss),
                    _fmt(a.p_value),
                    _fmt(a.error_rate),
                    _fmt(a.p95_latency_ms, 1),
                    _fmt(a.negative_rate),
                    "ok"
                    if a.guardrails_ok
                    else "VIOLATED: " + ", ".join(k for k, (_, _, ok) in a.guardrails.items() if ok is False),
                ]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append("(* control)")
        lines.append("")
        fb = ", ".join(
            f"{a.name}: " + (" ".join(f"{k}={v}" for k, v in sorted(a.feedback.items())) or "none") for a in self.arms
        )
        lines.append(f"feedback: {fb}")
        srm = self.srm
        lines.append(
            f"sample ratio: chi2={srm.chi2:.2f} p={srm.p_value:.4g} "
            + (
                "MISMATCH (p < 0.001): assignment or logging is broken, do not trust the results"
                if srm.flagged
                else "ok"
            )
        )
        lines.append(f"feedback not yet matched to a request (whole store): {self.pending_feedback}")
        for ch in self.adapter_changes:
            lines.append(
                f"adapter change {ch['ts']:%Y-%m-%d %H:%M} {ch['previous']} -> {ch['adapter']} "
                f"by {ch['actor']}: {ch['reason']}"
            )
        lines.append(f"decision (alpha={self.alpha:g}, always-valid p-values): {self.decision}")
        return "\n".join(lines)


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def build_report(
    root: Path | str,
    experiment_id: str,
    *,
    alpha: float = 0.05,
    con: duckdb.DuckDBPyConnection | None = None,
    now: datetime | None = None,
) -> Report:
    """Read the store and compute the report of ``experiment_id``."""
    root = Path(root)
    exp = ExperimentRepo(root).get(experiment_id)
    own = con is None
    con = con or StoreReader(root).connect()
    try:
        return _build(con, exp, alpha, now or datetime.now(UTC))
    finally:
        if own:
            con.close()


def _build(con: duckdb.DuckDBPyConnection, exp: Experiment, alpha: float, now: datetime) -> Report:
    arms = {a.name: ArmReport(a.name, a.adapter, a.weight) for a in exp.arms}
    for name, requests, users, anon, errors, p95 in con.execute(
        """SELECT arm, count(*), count(DISTINCT "user"), count(*) FILTER (WHERE "user" IS NULL),
                  count(*) FILTER (WHERE status >= 500), quantile_cont(latency_ms, 0.95)
           FROM requests WHERE experiment_id = ? GROUP BY arm""",
        [exp.id],
    ).fetchall():
        if name not in arms:
            arms[name] = ArmReport(name, None, 0.0)
        a = arms[name]
        a.requests, a.users, a.units = int(requests), int(users), int(users) + int(anon)
        a.error_rate = errors / requests if requests else float("nan")
        a.p95_latency_ms = float(p95) if p95 is not None else float("nan")
    for name, kind, n in con.execute(
        "SELECT arm, kind, count(*) FROM feedback WHERE experiment_id = ? GROUP BY ALL", [exp.id]
    ).fetchall():
        if name in arms:
            arms[name].feedback[kind] = int(n)
    kind = "thumbs" if exp.primary_metric == "thumbs_up_rate" else "score"
    daily = con.execute(_RATED_SQL, {"e": exp.id}).fetchall()
    for name, k, _, n, s, _ in daily:
        if k == "thumbs" and name in arms:
            arms[name].thumbs_up += int(s)
            arms[name].thumbs_down += int(n - s)
    series = _series([row for row in daily if row[1] == kind and row[0] in arms], list(arms))
    points, diff_samples = _compare(exp, arms, series, kind, alpha)
    _guardrails(exp, arms)
    # The split is checked on the units first exposed under the current weights: after a ramp
    # (10 % -> 50 %) the units of earlier layouts follow other weights.
    since = exp.layout_since or exp.start
    units = dict.fromkeys(arms, 0)
    for name, n in con.execute(
        """SELECT arm, count(*) FROM (
               SELECT coalesce("user", request_id) AS unit, arg_min(arm, ts) AS arm, min(ts) AS first
               FROM requests WHERE experiment_id = ? GROUP BY unit)
           WHERE first >= ? GROUP BY arm""",
        [exp.id, since],
    ).fetchall():
        if name in units:
            units[name] = int(n)
    srm = stats.srm_check(units, {a.name: a.weight for a in exp.arms})
    winner, decision = _decide(exp, arms, srm, alpha)
    pending = con.execute("SELECT count(*) FROM feedback_pending").fetchone()  # a small temp table
    changes = con.execute(
        """SELECT ts, adapter, previous, actor, reason FROM adapter_changes
           WHERE alias = ? AND ts >= ? AND (? IS NULL OR ts <= ?) ORDER BY ts""",
        [exp.alias, exp.start - timedelta(days=1), exp.end, exp.end],
    ).fetchall()
    return Report(
        experiment=exp,
        generated_at=now,
        arms=list(arms.values()),
        srm=srm,
        daily=points,
        winner=winner,
        decision=decision,
        alpha=alpha,
        pending_feedback=int(pending[0]) if pending else 0,
        adapter_changes=[dict(zip(("ts", "adapter", "previous", "actor", "reason"), c, strict=True)) for c in changes],
        diff_samples=diff_samples,
    )


def _series(rows: list[tuple[Any, ...]], names: list[str]) -> tuple[list[int], dict[str, np.ndarray]]:
    """Cumulative (n, sum, sum of squares) per arm on a common day axis."""
    days = sorted({int(r[2]) for r in rows})
    index = {d: i for i, d in enumerate(days)}
    out = {n: np.zeros((3, len(days))) for n in names}
    for name, _, day, n, s, ss in rows:
        out[name][:, index[int(day)]] += (n, s, ss)
    return days, {n: np.cumsum(v, axis=1) for n, v in out.items()}


def _moments(cum: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, s, ss = cum
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s / n
        var = np.where(n > 1, (ss - n * mean**2) / (n - 1), np.nan)
    return n, mean, np.maximum(var, 0.0)


def _compare(
    exp: Experiment,
    arms: dict[str, ArmReport],
    series: tuple[list[int], dict[str, np.ndarray]],
    kind: str,
    alpha: float,
) -> tuple[list[DailyPoint], dict[str, np.ndarray]]:
    days, cums = series
    points: list[DailyPoint] = []
    samples: dict[str, np.ndarray] = {}
    if not days:
        return points, samples
    c_n, c_mean, c_var = _moments(cums[exp.control])
    rng = np.random.default_rng(0)
    for name, arm in arms.items():
        n, mean, var = _moments(cums[name])
        arm.metric_n = int(n[-1])
        arm.metric = float(mean[-1]) if n[-1] else float("nan")
        arm.metric_var = float(var[-1])
        if kind == "thumbs":
            arm.metric_ci = stats.wilson_interval(int(cums[name][1, -1]), arm.metric_n)
        else:
            arm.metric_ci = stats.mean_interval(arm.metric, float(np.sqrt(var[-1])), arm.metric_n)
        pvals: np.ndarray | None = None
        if name != exp.control:
            if kind == "thumbs":
                pvals = stats.sequential_binary(cums[name][1], n, cums[exp.control][1], c_n)
                cmp = stats.beta_binomial(
                    int(cums[name][1, -1]), arm.metric_n, int(cums[exp.control][1, -1]), int(c_n[-1]), rng=rng
                )
            else:
                pvals = stats.sequential_means(mean, var, n, c_mean, c_var, c_n)
                cmp = stats.normal_means(
                    arm.metric,
                    float(var[-1]),
                    arm.metric_n,
                    float(c_mean[-1]),
                    float(c_var[-1]),
                    int(c_n[-1]),
                    rng=rng,
                )
            arm.p_value = float(pvals[-1])
            arm.prob_beat, arm.expected_loss = cmp.prob_beat, cmp.expected_loss
            samples[name] = cmp.diff_samples
        for i, day in enumerate(days):
            if kind == "thumbs":
                ci = stats.wilson_interval(int(cums[name][1, i]), int(n[i]))
            else:
                ci = stats.mean_interval(float(mean[i]), float(np.sqrt(var[i])), int(n[i]))
            points.append(
                DailyPoint(
                    date(1970, 1, 1) + timedelta(days=day),
                    name,
                    int(n[i]),
                    float(mean[i]) if n[i] else float("nan"),
                    ci,
                    float(pvals[i]) if pvals is not None else None,
                )
            )
    return points, samples


def _guardrails(exp: Experiment, arms: dict[str, ArmReport]) -> None:
    g = exp.guardrails
    for a in arms.values():
        a.guardrails = {
            "error_rate": (
                a.error_rate,
                g.error_rate_max,
                stats.guardrail_ok(a.error_rate, g.error_rate_max),
            ),
            "p95_latency_ms": (
                a.p95_latency_ms,
                g.p95_latency_ms_max,
                stats.guardrail_ok(a.p95_latency_ms, g.p95_latency_ms_max),
            ),
            "negative_feedback_rate": (
                a.negative_rate,
                g.negative_feedback_rate_max,
                stats.guardrail_ok(a.negative_rate, g.negative_feedback_rate_max),
            ),
        }


def _decide(exp: Experiment, arms: dict[str, ArmReport], srm: stats.SRMResult, alpha: float) -> tuple[str | None, str]:
    if srm.flagged:
        return None, "no decision: sample ratio mismatch"
    others = [a for a in arms.values() if a.name != exp.control and a.p_value is not None]
    level = stats.bonferroni(alpha, len(others))
    control = arms[exp.control]
    better = [a for a in others if a.p_value is not None and a.p_value < level and a.metric > control.metric]
    worse = [a.name for a in others if a.p_value is not None and a.p_value < level and a.metric < control.metric]
    notes = [f"{', '.join(worse)} significantly worse than control"] if worse else []
    blocked = [a.name for a in better if not a.guardrails_ok]
    eligible = [a for a in better if a.guardrails_ok]
    if blocked:
        notes.append(f"{', '.join(blocked)} better but violate guardrails")
    if eligible:
        best = max(eligible, key=lambda a: a.metric)
        return best.name, "; ".join([f"winner {best.name} (p={best.p_value:.3g} < {level:.3g})", *notes])
    if not control.guardrails_ok:
        notes.append("control violates guardrails")
    return None, "; ".join(["no winner yet: keep running", *notes])
