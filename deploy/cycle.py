"""`loraloop cycle`: what cron or the Kubernetes CronJob runs each night.

1. Every running canary is evaluated (promote / roll back / ramp / keep running).
2. Every configured alias without a running canary and with enough new feedback since its last
   successful run is retrained → gated → started as a canary.

A lock file makes a second concurrent cycle exit at once (code 75). One alias failing does not stop
the others and never touches serving (retraining writes nothing the gateway serves until the gate
passes; the canary starts only then). Exit codes: 0 nothing to do, 10 acted, 1 an alias failed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from feedback.reader import StoreReader
from serving.settings import Settings

from .controller import PromotionController
from .gateway_admin import GatewayFleet
from .registry import Registry, RegistryConfig

logger = logging.getLogger(__name__)

EXIT_NOTHING, EXIT_ACTED, EXIT_FAILED, EXIT_LOCKED = 0, 10, 1, 75
ACTING = {"promote", "rollback", "timeout", "ramp", "canary_started"}


class CycleLocked(RuntimeError):
    """Another cycle holds the lock."""


@dataclass
class CycleResult:
    started_at: str
    finished_at: str = ""
    actions: dict[str, list[str]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        if self.failed:
            return EXIT_FAILED
        acted = any(a.split(":")[0] in ACTING for acts in self.actions.values() for a in acts)
        return EXIT_ACTED if acted else EXIT_NOTHING


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


def gateway_urls(settings: Settings) -> list[str]:
    return settings.promotion.gateway_urls or [f"http://{settings.host}:{settings.port}"]


def last_watermark(settings: Settings, alias: str) -> str | None:
    """The data watermark of the alias's last run that got past training (registered or gated out)."""
    from retrain.records import RunRecords

    runs = RunRecords(settings.registry_path.with_name("runs.duckdb")).list(alias)
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


def run_cycle(settings: Settings, *, now: datetime | None = None) -> CycleResult:
    state_dir = settings.cycle.state_dir
    result = CycleResult(started_at=datetime.now(UTC).isoformat())
    with cycle_lock(state_dir):
        registry = Registry(RegistryConfig(path=settings.registry_path, adapter_root=settings.adapter_root))
        key = settings.admin_key.get_secret_value() if settings.admin_key else ""
        fleet = GatewayFleet(gateway_urls(settings), key, settings.promotion.request_timeout_s)
        controller = PromotionController(registry, fleet, settings.store.root, settings.promotion)
        try:
            canary_aliases = {e.alias for e in controller.repo.list() if e.id.startswith("canary-")}
            for alias in sorted(set(settings.cycle.aliases) | canary_aliases):
                actions = result.actions.setdefault(alias, [])
                try:
                    decision = controller.evaluate(alias, now=now)
                    if decision is not None:
                        actions.append(f"{decision.action}: {decision.reason}")
                    if alias not in settings.cycle.aliases or controller.running_canary(alias) is not None:
                        continue
                    since = last_watermark(settings, alias)
                    fresh = new_feedback(settings, alias, since)
                    needed = settings.cycle.aliases[alias].min_new_feedback
                    if fresh < needed:
                        actions.append(f"skip: {fresh} new feedback since {since or 'the start'} (< {needed})")
                        continue
                    outcome, version = retrain_alias(settings, alias, since)
                    actions.append(f"retrain: {outcome} {version or ''}".strip())
                    if outcome == "registered" and version is not None:
                        exp = controller.start_canary(version)
                        actions.append(f"canary_started: {version} in {exp.id}")
                except Exception as exc:  # one alias failing never stops the others
                    logger.exception("cycle failed for alias %s", alias)
                    result.failed[alias] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        finally:
            fleet.close()
        result.finished_at = datetime.now(UTC).isoformat()
        write_status(state_dir, result)
    return result


def write_status(state_dir: Path, result: CycleResult) -> None:
    """The last cycle's outcome, read by the gateways' metrics (loraloop_cycle_*)."""
    status = {**asdict(result), "exit_code": result.exit_code, "finished_ts": time.time()}
    path = state_dir / "last_cycle.json"
    previous = read_status(state_dir)
    status["last_success_ts"] = status["finished_ts"] if not result.failed else previous.get("last_success_ts")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status, indent=2))
    os.replace(tmp, path)


def read_status(state_dir: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((state_dir / "last_cycle.json").read_text())
        return data
    except (OSError, ValueError):
        return {}
