"""Registry and cycle figures on the gateway's /metrics: champion version per alias, canary status,
promotions, rollbacks, the last successful cycle. Read on each scrape through the shared layer (the
registry file under its lock, the cycle's status file), so every gateway replica shows the same truth
without importing the controller that writes them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from core.cycle_status import last_actions, read_status
from core.registry import Registry, RegistryConfig

logger = logging.getLogger(__name__)


class RegistryCollector(Collector):
    def __init__(self, registry_path: Path, cycle_state_dir: Path) -> None:
        self.registry_path = registry_path
        self.cycle_state_dir = cycle_state_dir

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        champion = GaugeMetricFamily("loraloop_champion_version", "Version number of each alias's champion.",
                                     labels=["alias", "version"])  # fmt: skip
        canary = GaugeMetricFamily("loraloop_canary_status", "1 for each adapter version in canary.",
                                   labels=["alias", "version"])  # fmt: skip
        promotions = CounterMetricFamily("loraloop_promotions", "Canaries promoted to champion.", labels=["alias"])
        rollbacks = CounterMetricFamily("loraloop_rollbacks", "Canaries or champions rolled back.", labels=["alias"])
        cycle = GaugeMetricFamily("loraloop_cycle_last_success_timestamp_seconds",
                                  "Unix time of the last cycle that finished without a failed alias.")  # fmt: skip
        paused = GaugeMetricFamily("loraloop_canary_paused",
                                   "1 when the last cycle paused the alias's canary (sample-ratio mismatch).",
                                   labels=["alias"])  # fmt: skip
        if self.registry_path.exists():
            try:
                reg = Registry(RegistryConfig(path=self.registry_path))
                for v in reg.list():
                    if v.status == "champion":
                        champion.add_metric([v.alias, v.version], v.number)
                    elif v.status == "canary":
                        canary.add_metric([v.alias, v.version], 1)
                counts: dict[str, list[int]] = {}
                for e in reg.audit():
                    c = counts.setdefault(e["alias"], [0, 0])
                    if e["to_status"] == "champion" and e["from_status"] == "canary":
                        c[0] += 1
                    elif e["to_status"] == "rejected" and e["from_status"] in ("canary", "champion"):
                        c[1] += 1
                for alias, (p, r) in counts.items():
                    promotions.add_metric([alias], p)
                    rollbacks.add_metric([alias], r)
            except Exception as exc:  # a scrape must never fail because of the registry
                logger.warning("registry metrics unavailable: %s", exc)
        status = read_status(self.cycle_state_dir)
        if status.get("last_success_ts"):
            cycle.add_metric([], float(status["last_success_ts"]))
        for alias, actions in last_actions(status).items():
            paused.add_metric([alias], float(any(a.kind == "pause" for a in actions)))
        yield from (champion, canary, promotions, rollbacks, cycle, paused)
