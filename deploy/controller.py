"""The promotion controller: a gated candidate becomes a canary arm (champion vs candidate on the
alias, ramped e.g. 10 % → 50 %), wins or loses on real feedback, and is promoted or rolled back —
every transition written to the registry's audit log with the figures that justified it.

`decide()` is a pure function of an experiment report (tested on recorded experiments); the
controller applies its decision to the gateway fleet, the experiment and the registry.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from core.deploy_config import PromotionConfig
from core.registry import AdapterVersion, Registry, RegistryError
from deploy.admin_client import GatewayFleet
from feedback.experiments import Experiment, ExperimentRepo
from feedback.report import ArmReport, Report, build_report

logger = logging.getLogger(__name__)

Action = Literal["promote", "rollback", "timeout", "ramp", "pause", "continue"]
CHAMPION, CANDIDATE = "champion", "candidate"
CANARY_PREFIX = "canary-"


@dataclass
class Decision:
    action: Action
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)
    next_share: float | None = None


def _num(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 6)


def arm_figures(arm: ArmReport) -> dict[str, Any]:
    return {
        "requests": arm.requests, "users": arm.users, "rated": arm.metric_n, "metric": _num(arm.metric),
        "thumbs_up": arm.thumbs_up, "thumbs_down": arm.thumbs_down, "error_rate": _num(arm.error_rate),
        "p95_latency_ms": _num(arm.p95_latency_ms), "prob_beat_champion": _num(arm.prob_beat),
        "p_value": _num(arm.p_value),
    }  # fmt: skip


def candidate_share(exp: Experiment) -> float:
    total = sum(a.weight for a in exp.arms)
    return exp.arm(CANDIDATE).weight / total if total else 0.0


def decide(report: Report, cfg: PromotionConfig, now: datetime | None = None) -> Decision:
    """What to do with a running canary, from its report (pure)."""
    exp = report.experiment
    arms = {a.name: a for a in report.arms}
    cand, champ = arms[CANDIDATE], arms[CHAMPION]
    figures = {"experiment": exp.id, CHAMPION: arm_figures(champ), CANDIDATE: arm_figures(cand),
               "srm_p_value": _num(report.srm.p_value), "share": round(candidate_share(exp), 4)}  # fmt: skip
    age_h = ((now or datetime.now(UTC)) - exp.start).total_seconds() / 3600
    if report.srm.flagged:
        if age_h >= cfg.max_duration_h:  # a paused canary does not run forever
            return Decision("timeout", f"sample ratio mismatch until the end ({age_h:.1f} h): champion stays", figures)
        return Decision("pause", f"sample ratio mismatch (p={report.srm.p_value:.2g}): decision paused", figures)
    g = cfg.guardrails
    if cand.requests >= g.min_requests:
        breaches = []
        if g.error_rate_max is not None and _num(cand.error_rate) is not None and cand.error_rate > g.error_rate_max:
            breaches.append(f"error rate {cand.error_rate:.3f} > {g.error_rate_max}")
        p95 = _num(cand.p95_latency_ms)
        if g.p95_latency_ms_max is not None and p95 is not None and p95 > g.p95_latency_ms_max:
            breaches.append(f"p95 latency {p95:.0f} ms > {g.p95_latency_ms_max:.0f} ms")
        rated = cand.thumbs_up + cand.thumbs_down
        if g.negative_feedback_rate_max is not None and rated >= g.min_requests:
            negative = cand.thumbs_down / rated
            if negative > g.negative_feedback_rate_max:
                breaches.append(f"negative feedback {negative:.3f} > {g.negative_feedback_rate_max}")
        if breaches:
            return Decision("rollback", "guardrail breach: " + "; ".join(breaches), figures)
    enough = cand.metric_n >= cfg.min_samples and champ.metric_n >= cfg.min_samples
    p_beat = _num(cand.prob_beat)
    if enough and p_beat is not None and 1 - p_beat >= cfg.worse_certainty:
        return Decision("rollback", f"clearly worse: P(candidate worse) = {1 - p_beat:.3f}", figures)
    if enough and report.winner == CANDIDATE and p_beat is not None and p_beat >= cfg.certainty:
        return Decision("promote", f"candidate wins: P(beats champion) = {p_beat:.3f}; {report.decision}", figures)
    if age_h >= cfg.max_duration_h:
        return Decision("timeout", f"no win after {age_h:.1f} h: the champion stays", figures)
    share = candidate_share(exp)
    later = [r for r in cfg.ramp if r > share + 1e-9]
    if later and cand.requests >= cfg.step_min_requests:
        return Decision("ramp", f"guardrails intact after {cand.requests} requests: ramp up", figures, later[0])
    return Decision("continue", f"keep running: {report.decision}", figures)


class PromotionController:
    """Applies decisions to the gateway fleet, the experiments and the registry."""

    def __init__(
        self,
        registry: Registry,
        fleet: GatewayFleet,
        store_root: Path,
        cfg: PromotionConfig,
        actor: str = "promotion-controller",
    ) -> None:
        self.registry = registry
        self.fleet = fleet
        self.store_root = store_root
        self.repo = ExperimentRepo(store_root, refresh_s=0)
        self.cfg = cfg
        self.actor = actor

    # --- canaries ---------------------------------------------------------------------------------
    def canary_aliases(self) -> set[str]:
        """Aliases with a canary experiment, running or not (the cycle evaluates each)."""
        return {e.alias for e in self.repo.list() if e.id.startswith(CANARY_PREFIX)}

    def running_canary(self, alias: str) -> Experiment | None:
        for exp in self.repo.list(alias):
            if exp.id.startswith(CANARY_PREFIX) and exp.status == "running":
                return exp
        return None

    def start_canary(self, version: str) -> Experiment:
        cand = self.registry.get(version)
        if cand.status != "candidate":
            raise RegistryError(f"{version} is {cand.status}, not a candidate")
        if self.running_canary(cand.alias) is not None:
            raise RegistryError(f"alias {cand.alias} already has a running canary")
        champion = self.registry.champion(cand.alias)
        self.fleet.register_adapter(version, cand.path)
        control_adapter: str | None
        if champion is not None:
            self.fleet.register_adapter(champion.version, champion.path)
            control_adapter = champion.version
        else:  # no registered champion yet: whatever the alias serves now (the base, or a manual adapter)
            control_adapter = next(iter(self.fleet.alias_targets(cand.alias).values()))
        share = self.cfg.ramp[0]
        exp = self.fleet.create_experiment({
            "alias": cand.alias, "id": f"{CANARY_PREFIX}{version}", "control": CHAMPION,
            "arms": [{"name": CHAMPION, "adapter": control_adapter, "weight": round(1 - share, 6)},
                     {"name": CANDIDATE, "adapter": version, "weight": share}],
            "description": f"canary of {version} against {control_adapter or 'the base'}",
        })  # fmt: skip
        figures = {"experiment": exp["id"], "share": share, "champion": control_adapter, "gate": cand.metrics}
        self.registry.transition(version, "canary", actor=self.actor, reason=f"canary at {share:.0%}", figures=figures)
        logger.info("started canary %s on %s at %.0f%%", version, cand.alias, share * 100)
        return self.repo.get(exp["id"])

    def evaluate(self, alias: str, now: datetime | None = None) -> Decision | None:
        """Decide on the alias's running canary and act; None when there is none."""
        exp = self.running_canary(alias)
        if exp is None:
            return None
        version = exp.arm(CANDIDATE).adapter
        assert version is not None
        decision = decide(build_report(self.store_root, exp.id, alpha=self.cfg.alpha, now=now), self.cfg, now)
        if decision.action == "promote":
            self.fleet.point(alias, version)  # every replica; zero failed requests (drained repoint)
            self.fleet.stop_experiment(exp.id)
            self.registry.transition(version, "champion", actor=self.actor, reason=decision.reason,
                                     figures=decision.figures)  # fmt: skip
        elif decision.action in ("rollback", "timeout"):
            self.fleet.stop_experiment(exp.id)  # the alias still points to the champion
            # a timeout is no verdict against the candidate: retired, not rejected (and no rollback alert)
            status = "rejected" if decision.action == "rollback" else "retired"
            self.registry.transition(version, status, actor=self.actor, reason=decision.reason,
                                     figures=decision.figures)  # fmt: skip
        elif decision.action == "ramp" and decision.next_share is not None:
            share = decision.next_share
            self.fleet.update_experiment(exp.id, {"weights": {CHAMPION: round(1 - share, 6), CANDIDATE: share}})
            self.registry.audit_event(version, actor=self.actor, reason=f"ramp to {share:.0%}: {decision.reason}",
                                      figures=decision.figures)  # fmt: skip
        elif decision.action == "pause":
            logger.error("ALERT canary %s paused: %s", exp.id, decision.reason)
            self.registry.audit_event(version, actor=self.actor, reason=decision.reason, figures=decision.figures)
        logger.info("canary %s: %s (%s)", exp.id, decision.action, decision.reason)
        return decision

    # --- rollback -----------------------------------------------------------------------------------
    def previous_champion(self, alias: str) -> AdapterVersion | None:
        """The most recently retired champion of the alias (still on disk: loadable in seconds)."""
        current = self.registry.champion(alias)
        for entry in reversed(self.registry.audit(alias)):
            retired = entry["from_status"] == "champion" and entry["to_status"] == "retired"
            if retired and (current is None or entry["version"] != current.version):
                candidate = self.registry.get(entry["version"])
                if candidate.status == "retired":
                    return candidate
        return None

    def rollback(self, alias: str, reason: str = "operator rollback") -> AdapterVersion | None:
        """During a canary: stop it (the champion stays). Otherwise: back to the previous champion (or
        the base when there is none). Returns the registry version that serves now."""
        canary = self.running_canary(alias)
        if canary is not None:  # roll back the canary: the champion stays
            self.fleet.stop_experiment(canary.id)
            cand = canary.arm(CANDIDATE).adapter
            if cand is not None and self.registry.get(cand).status == "canary":
                self.registry.transition(cand, "rejected", actor=self.actor, reason=f"{reason}: canary stopped")
            return self.registry.champion(alias)
        current = self.registry.champion(alias)
        previous = self.previous_champion(alias)
        if previous is not None:
            self.fleet.register_adapter(previous.version, previous.path)
        self.fleet.point(alias, previous.version if previous is not None else None)
        if current is not None:
            self.registry.transition(current.version, "rejected", actor=self.actor, reason=f"rolled back: {reason}")
        if previous is not None:
            self.registry.transition(previous.version, "champion", actor=self.actor, reason=f"reinstated: {reason}")
        return previous
