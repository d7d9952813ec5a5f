"""`loraloop cycle`: what cron or the Kubernetes CronJob runs each night.

1. Every running canary is evaluated (promote / roll back / ramp / keep running).
2. Every configured alias without a running canary, whose champion was not promoted in this run, and
   with enough new training rows since its watermark is retrained → gated → started as a canary. The
   watermark is the last run's, or the moment the current champion took over if that is later: a run
   learns only from traffic its champion served. Too little data is a skip, not a failure.

A lock file makes a second concurrent cycle exit at once (code 75). One alias failing does not stop
the others and never touches serving (retraining writes nothing the gateway serves until the gate
passes; the canary starts only then). Exit codes (core.errors.ExitCode): 0 nothing to do, 10 acted, 1 an
alias failed, 75 locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.cycle_status import CycleAction, CycleResult, write_status
from core.errors import ExitCode, LoraloopError
from core.registry import Registry, RegistryConfig
from core.runs import RunRecords
from core.settings import Settings
from feedback.export import count_training_rows, parse_watermark
from retrain.recipe import Recipe, load_recipe

from .admin_client import GatewayFleet
from .controller import PromotionController

if TYPE_CHECKING:
    from retrain.run import RunResult

logger = logging.getLogger(__name__)


class CycleLocked(LoraloopError, RuntimeError):
    """Another cycle holds the lock."""

    exit_code = ExitCode.LOCKED


@contextlib.contextmanager
def cycle_lock(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "cycle.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CycleLocked(f"another cycle is running (lock {state_dir / 'cycle.lock'})") from None
        yield
    finally:
        os.close(fd)


def last_watermark(settings: Settings, alias: str) -> str | None:
    """The data watermark of the alias's last run that got past training (registered or gated out)."""
    runs = RunRecords(settings.runs_path).list(alias)
    done = [r for r in runs if r["outcome"] in ("registered", "rejected") and r["data_watermark"]]
    return str(done[-1]["data_watermark"]) if done else None


def champion_since(registry: Registry, alias: str) -> datetime | None:
    """When the alias's current champion became champion (promoted, or reinstated by a rollback)."""
    champion = registry.champion(alias)
    if champion is None:
        return None
    entries = [e for e in registry.audit(alias) if e["version"] == champion.version and e["to_status"] == "champion"]
    return max((e["at"] for e in entries), default=None)


def training_watermark(settings: Settings, registry: Registry, alias: str) -> str | None:
    """Where the alias's next training data starts: after the last run's data, and never before the current
    champion took over, so that a run learns only from traffic that champion served (docs/deploy.md)."""
    candidates = [t for t in (parse_watermark(last_watermark(settings, alias)), champion_since(registry, alias)) if t]
    return max(candidates).isoformat() if candidates else None


def new_training_rows(settings: Settings, alias: str, recipe: Recipe, since: str | None) -> int:
    """The rows the alias's next export would give (SFT rows + preference pairs): the unit of `min_rows`."""
    counts = count_training_rows(settings.store.root, since=parse_watermark(since), alias=alias,
                                 lag_s=_lag(settings, recipe), good_score=recipe.data.good_score,
                                 bad_score=recipe.data.bad_score)  # fmt: skip
    return counts["sft"] + counts["pairs"]


def _lag(settings: Settings, recipe: Recipe) -> float:
    return recipe.data.lag_s if recipe.data.lag_s is not None else settings.store.export_lag_s


def retrain_alias(settings: Settings, alias: str, since: str | None) -> RunResult:
    """Run the alias's recipe from ``since``, gating through the vLLM that production serves."""
    # imported here: training pulls in transformers, peft and TRL, which every other command can do without
    from retrain.run import run_recipe

    spec = settings.cycle.aliases[alias]
    overrides: dict[str, Any] = {}
    if settings.backends.mode == "managed":  # gate on the base production serves, through its vLLM
        overrides["eval.vllm_url"] = f"http://{settings.backends.managed.host}:{settings.backends.managed.port}"
    elif settings.backends.urls:
        overrides["eval.vllm_url"] = settings.backends.urls[0]
    return run_recipe(
        spec.recipe, alias=alias, since=since, store_root=settings.store.root,
        export_lag_s=settings.store.export_lag_s,
        registry=RegistryConfig(path=settings.registry_path, adapter_root=settings.adapter_root),
        max_lora_rank=settings.max_lora_rank, actor="cycle", overrides=overrides,
    )  # fmt: skip


def cycle_alias(
    settings: Settings, controller: PromotionController, alias: str, now: datetime | None, actions: list[CycleAction]
) -> None:
    """One alias's night: decide on its canary; retrain when it has none, no champion was promoted tonight, and
    there is enough new data. What was done is appended to ``actions`` as it happens (kept when a later step
    fails)."""
    decision = controller.evaluate(alias, now=now)
    if decision is not None:
        actions.append(CycleAction(decision.action, decision.reason))
    if alias not in settings.cycle.aliases or controller.running_canary(alias) is not None:
        return
    if decision is not None and decision.action == "promote":
        actions.append(CycleAction("skip", "a new champion tonight: the next run learns from the traffic it serves"))
        return
    spec = settings.cycle.aliases[alias]
    since = training_watermark(settings, controller.registry, alias)
    fresh = new_training_rows(settings, alias, load_recipe(spec.recipe), since)
    if fresh < spec.min_new_rows:
        actions.append(CycleAction("skip", f"{fresh} new training rows since {since or 'the start'} "
                                           f"(< {spec.min_new_rows})"))  # fmt: skip
        return
    result = retrain_alias(settings, alias, since)
    if result.outcome == "skipped":
        actions.append(CycleAction("skip", f"not enough data after preparation: {result.reason}"))
        return
    actions.append(CycleAction("retrain", f"{result.outcome} {result.version or ''}".strip()))
    if result.outcome == "registered" and result.version is not None:
        exp = controller.start_canary(result.version)
        actions.append(CycleAction("canary_started", f"{result.version} in {exp.id}"))


def run_cycle(settings: Settings, *, now: datetime | None = None) -> CycleResult:
    state_dir = settings.cycle.state_dir
    result = CycleResult(started_at=datetime.now(UTC).isoformat())
    with cycle_lock(state_dir):
        registry = Registry(RegistryConfig(path=settings.registry_path, adapter_root=settings.adapter_root))
        fleet = GatewayFleet.from_settings(settings)
        controller = PromotionController(registry, fleet, settings.store.root, settings.promotion)
        try:
            for alias in sorted(set(settings.cycle.aliases) | controller.canary_aliases()):
                try:
                    cycle_alias(settings, controller, alias, now, result.actions.setdefault(alias, []))
                except Exception as exc:  # one alias failing never stops the others
                    logger.exception("cycle failed for alias %s", alias)
                    result.failed[alias] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        finally:
            fleet.close()
        result.finished_at = datetime.now(UTC).isoformat()
        write_status(state_dir, result)
    return result
