"""`loraloop cycle`: what cron or the Kubernetes CronJob runs each night.

1. Every running canary is evaluated (promote / roll back / ramp / keep running).
2. Every configured alias without a running canary and with enough new feedback since its last
   successful run is retrained → gated → started as a canary.

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
from typing import Any

from core.cycle_status import CycleAction, CycleResult, write_status
from core.errors import ExitCode, LoraloopError
from core.registry import Registry, RegistryConfig
from core.runs import RunRecords
from core.settings import Settings
from feedback.reader import StoreReader

from .admin_client import GatewayFleet
from .controller import PromotionController

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


def new_feedback(settings: Settings, alias: str, since: str | None) -> int:
    con = StoreReader(settings.store.root).connect()
    try:
        sql = "SELECT count(*) FROM feedback WHERE alias = ?"
        params: list[Any] = [alias]
        if since:
            sql += " AND logged_at > CAST(? AS TIMESTAMPTZ)"
            params.append(since)
        row = con.execute(sql, params).fetchone()
        return int(row[0]) if row else 0
    finally:
        con.close()


def retrain_alias(settings: Settings, alias: str, since: str | None) -> tuple[str, str | None]:
    """Run the alias's recipe; returns (outcome, registered version)."""
    # imported here: training pulls in transformers, peft and TRL, which every other command can do without
    from retrain.run import run_recipe

    spec = settings.cycle.aliases[alias]
    overrides: dict[str, Any] = {}
    if settings.backends.mode == "managed":  # gate on the base production serves, through its vLLM
        overrides["eval.vllm_url"] = f"http://{settings.backends.managed.host}:{settings.backends.managed.port}"
    elif settings.backends.urls:
        overrides["eval.vllm_url"] = settings.backends.urls[0]
    result = run_recipe(
        spec.recipe, alias=alias, since=since, store_root=settings.store.root,
        registry=RegistryConfig(path=settings.registry_path, adapter_root=settings.adapter_root),
        max_lora_rank=settings.max_lora_rank, actor="cycle", overrides=overrides,
    )  # fmt: skip
    return result.outcome, result.version


def cycle_alias(
    settings: Settings, controller: PromotionController, alias: str, now: datetime | None, actions: list[CycleAction]
) -> None:
    """One alias's night: decide on its canary; retrain when it has none and enough new feedback. What was
    done is appended to ``actions`` as it happens (kept when a later step fails)."""
    decision = controller.evaluate(alias, now=now)
    if decision is not None:
        actions.append(CycleAction(decision.action, decision.reason))
    if alias not in settings.cycle.aliases or controller.running_canary(alias) is not None:
        return
    since = last_watermark(settings, alias)
    fresh = new_feedback(settings, alias, since)
    needed = settings.cycle.aliases[alias].min_new_feedback
    if fresh < needed:
        actions.append(CycleAction("skip", f"{fresh} new feedback since {since or 'the start'} (< {needed})"))
        return
    outcome, version = retrain_alias(settings, alias, since)
    actions.append(CycleAction("retrain", f"{outcome} {version or ''}".strip()))
    if outcome == "registered" and version is not None:
        exp = controller.start_canary(version)
        actions.append(CycleAction("canary_started", f"{version} in {exp.id}"))


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
