"""`loraloop cycle` without vLLM: a fake gateway fleet (the admin calls, applied to the store's experiments
and an alias table), a real registry, a real event store and real `Settings`. Covers the lock, the exit
codes, the status file and idempotence. Retraining is reached only through a recipe that fails at once."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

import deploy.cycle
from core.cycle_status import CycleAction, last_actions
from core.deploy_config import PromotionConfig
from core.errors import ExitCode
from core.registry import Registry
from core.runs import RunRecords
from core.settings import Settings
from deploy.cli import main as cli
from deploy.controller import PromotionController
from deploy.cycle import CycleLocked, cycle_lock, run_cycle
from feedback.events import FeedbackEvent, RequestEvent
from feedback.experiments import ExperimentRepo
from feedback.store import EventStore
from retrain.recipe import load_recipe
from serving.registry_metrics import RegistryCollector
from tests.deploy.test_controller_decisions import (
    EXP,
    ArmPlan,
    FakeFleet,
    record,
    registry_with_champion,
    store_config,
)

ADMIN_KEY = "adm-cycle-test-key-42"
FLEET_URL = "http://127.0.0.1:9"  # nothing listens: every admin call goes to the fake fleet


def settings_values(tmp_path: Path, aliases: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Settings as plain values (for `Settings(**values)` and for a YAML file)."""
    return {
        "model": "tiny",
        "admin_key": ADMIN_KEY,
        "adapter_root": str(tmp_path / "adapters"),
        "state_dir": str(tmp_path / "state"),
        "registry_path": str(tmp_path / "registry.duckdb"),
        "replica_id": "cycle-test",
        "backends": {"mode": "remote", "urls": [FLEET_URL]},
        "aliases": {"x": {}, "broken": {}},
        "store": {"root": str(tmp_path / "events"), "flush_interval_s": 0.01, "export_lag_s": 0},
        "promotion": {"gateway_urls": [FLEET_URL], "ramp": [0.5], "min_samples": 100},
        "cycle": {"state_dir": str(tmp_path / "cycle"), "aliases": aliases or {}},
    }


def make_settings(tmp_path: Path, aliases: dict[str, dict[str, Any]] | None = None) -> Settings:
    return Settings(**settings_values(tmp_path, aliases))


@pytest.fixture(autouse=True)
def x_recipe(tmp_path: Path) -> Path:
    """The recipe `x` names: loadable (the cycle reads its scores and lag to count rows); its base does not exist,
    so a run that gets as far as training fails at once."""
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"model": {"base": str(tmp_path / "no-base")}}))
    return path


def write_config(tmp_path: Path, aliases: dict[str, dict[str, Any]] | None = None) -> str:
    path = tmp_path / "loraloop.yaml"
    path.write_text(yaml.safe_dump(settings_values(tmp_path, aliases)))
    return str(path)


class Fleets:
    """Every fake fleet run_cycle creates (one per cycle), sharing one alias table."""

    def __init__(self, store_root: Path, aliases: dict[str, str | None]) -> None:
        self.store_root = store_root
        self.aliases = aliases
        self.made: list[FakeFleet] = []

    def __call__(self, urls: list[str], admin_key: str, timeout_s: float = 600.0) -> FakeFleet:
        assert urls == [FLEET_URL] and admin_key == ADMIN_KEY
        fleet = FakeFleet(self.store_root, self.aliases)
        fleet.aliases = self.aliases  # shared: what one cycle points, the next one sees
        self.made.append(fleet)
        return fleet

    def from_settings(self, settings: Settings) -> FakeFleet:  # as GatewayFleet.from_settings
        key = settings.admin_key.get_secret_value() if settings.admin_key else ""
        return self(settings.promotion.gateway_urls, key, settings.promotion.request_timeout_s)


@pytest.fixture
def fleets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fleets:
    f = Fleets(tmp_path / "events", {"x": "x-v1", "broken": None})
    monkeypatch.setattr(deploy.cycle, "GatewayFleet", f)
    monkeypatch.delenv("LORALOOP_ADMIN_KEY", raising=False)
    return f


def status(tmp_path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((tmp_path / "cycle" / "last_cycle.json").read_text())
    return data


def winning_canary(tmp_path: Path) -> Registry:
    """x-v1 champion, x-v2 in a canary (started by the controller) that clearly wins on recorded feedback."""
    reg = registry_with_champion(tmp_path)
    root = tmp_path / "events"
    ctl = PromotionController(reg, FakeFleet(root, {"x": "x-v1"}), root, PromotionConfig(ramp=[0.5]))
    ctl.start_canary("x-v2")
    record(root, {"champion": ArmPlan(400, 300, 0.5), "candidate": ArmPlan(400, 300, 0.8)}, create=False)
    return reg


def plain_feedback(root: Path, alias: str, n: int) -> None:
    """`n` rated requests on `alias` (no experiment), every other one thumbs up: ``(n + 1) // 2`` SFT rows."""
    with EventStore(store_config(root), "gw-plain", CollectorRegistry()) as store:
        for i in range(n):
            rid = f"{alias}-plain-{i}"
            store.submit(RequestEvent(request_id=rid, alias=alias, endpoint="completions", user=f"u{i}",
                                      prompt=f"question {i}", completion="ok", latency_ms=50.0, status=200,
                                      replica="gw-plain"))  # fmt: skip
            store.write_feedback(FeedbackEvent(request_id=rid, kind="thumbs", value=i % 2 == 0))


# --- exit codes, status file, idempotence ------------------------------------------------------------------


def test_nothing_to_do_exits_0_and_writes_the_status(tmp_path: Path, fleets: Fleets) -> None:
    settings = make_settings(tmp_path, {"x": {"recipe": str(tmp_path / "x.yaml"), "min_new_rows": 50}})
    before = time.time()
    result = run_cycle(settings)
    assert result.exit_code == ExitCode.OK, result
    assert (
        result.actions == {"x": [CycleAction("skip", "0 new training rows since the start (< 50)")]}
        and not result.failed
    )
    st = status(tmp_path)
    assert st["exit_code"] == 0 and st["failed"] == {} and last_actions(st) == result.actions
    assert before <= st["last_success_ts"] == st["finished_ts"] <= time.time()
    assert st["started_at"] <= st["finished_at"]
    assert [f.calls for f in fleets.made] == [[]]  # nothing was changed on the gateways
    assert not (tmp_path / "cycle" / "last_cycle.tmp").exists()


def test_promoted_canary_exits_10_and_a_second_run_does_nothing(tmp_path: Path, fleets: Fleets) -> None:
    reg = winning_canary(tmp_path)
    settings = make_settings(tmp_path, {"x": {"recipe": str(tmp_path / "x.yaml"), "min_new_rows": 100_000}})
    first = run_cycle(settings)
    assert first.exit_code == ExitCode.ACTED, first
    promote, skip = first.actions["x"]
    assert promote.kind == "promote" and promote.detail.startswith("candidate wins")
    assert skip == CycleAction("skip", "a new champion tonight: the next run learns from the traffic it serves")
    assert reg.get("x-v2").status == "champion" and reg.get("x-v1").status == "retired"
    assert ExperimentRepo(tmp_path / "events").get(EXP).status == "stopped"
    assert fleets.made[0].calls == [("point", ("x", "x-v2")), ("stop_experiment", EXP)]
    assert fleets.aliases["x"] == "x-v2"
    st1 = status(tmp_path)
    assert st1["exit_code"] == ExitCode.ACTED and st1["last_success_ts"] == st1["finished_ts"]

    audit = reg.audit()
    second = run_cycle(settings)
    assert second.exit_code == ExitCode.OK, second
    assert [a.kind for a in second.actions["x"]] == ["skip"]
    assert fleets.made[1].calls == []  # nothing new: nothing is touched
    assert reg.audit() == audit and reg.get("x-v2").status == "champion"
    st2 = status(tmp_path)
    assert st2["exit_code"] == ExitCode.OK and st2["last_success_ts"] >= st1["last_success_ts"]


def test_canary_of_an_alias_outside_the_cycle_config_is_still_evaluated(tmp_path: Path, fleets: Fleets) -> None:
    reg = winning_canary(tmp_path)
    result = run_cycle(make_settings(tmp_path, {}))
    assert result.exit_code == ExitCode.ACTED and list(result.actions) == ["x"], result
    assert [a.kind for a in result.actions["x"]] == ["promote"]  # no retraining: not configured
    assert reg.get("x-v2").status == "champion"


def test_missing_recipe_fails_that_alias_only(tmp_path: Path, fleets: Fleets) -> None:
    """`broken` has enough new feedback but its recipe file is missing: exit 1, while `x` (sorted after it)
    is still evaluated and promoted; the last success time stays that of the previous good cycle."""
    reg = winning_canary(tmp_path)
    plain_feedback(tmp_path / "events", "broken", 6)
    good = run_cycle(make_settings(tmp_path, {}))  # a first cycle without `broken`: nothing failed
    assert good.exit_code == ExitCode.ACTED
    reg.register_candidate("x", tmp_path / "adapters" / "x-v3", base_model="tiny")
    broken = {"recipe": str(tmp_path / "missing.yaml"), "min_new_rows": 5}
    settings = make_settings(
        tmp_path, {"broken": broken, "x": {"recipe": str(tmp_path / "x.yaml"), "min_new_rows": 100_000}}
    )
    ctl = PromotionController(reg, FakeFleet(tmp_path / "events", {"x": "x-v2"}), tmp_path / "events",
                              PromotionConfig(ramp=[0.5]))  # fmt: skip
    ctl.start_canary("x-v3")
    record(tmp_path / "events", {"champion": ArmPlan(400, 300, 0.5), "candidate": ArmPlan(400, 300, 0.85)},
           create=False, exp_id="canary-x-v3", seed=7)  # fmt: skip
    result = run_cycle(settings)
    assert result.exit_code == ExitCode.FAILED, result
    assert list(result.failed) == ["broken"] and "missing.yaml" in result.failed["broken"]
    assert result.failed["broken"].startswith("RecipeError")
    assert result.actions["broken"] == []
    assert [a.kind for a in result.actions["x"]] == ["promote", "skip"]
    assert reg.get("x-v3").status == "champion"
    st = status(tmp_path)
    assert st["exit_code"] == ExitCode.FAILED and st["failed"] == result.failed
    assert st["last_success_ts"] < st["finished_ts"]  # the previous good cycle's
    # nothing was recorded as a run: the next night tries again from the same watermark
    assert deploy.cycle.last_watermark(settings, "broken") is None


def test_skip_counts_the_training_rows_of_the_alias(tmp_path: Path, fleets: Fleets, x_recipe: Path) -> None:
    """4 rated requests, 2 of them thumbs up: 2 SFT rows, the unit of the recipe's min_rows (not 4 events);
    another alias's 7 good rows do not count."""
    plain_feedback(tmp_path / "events", "quiet", 4)
    plain_feedback(tmp_path / "events", "x", 13)
    values = settings_values(tmp_path, {"quiet": {"recipe": str(x_recipe), "min_new_rows": 3}})
    values["aliases"]["quiet"] = {}
    result = run_cycle(Settings(**values))
    assert result.exit_code == ExitCode.OK, result
    assert result.actions == {"quiet": [CycleAction("skip", "2 new training rows since the start (< 3)")]}
    assert deploy.cycle.new_training_rows(Settings(**values), "x", load_recipe(x_recipe), None) == 7


def test_after_a_promotion_only_the_new_champions_traffic_counts(
    tmp_path: Path, fleets: Fleets, x_recipe: Path
) -> None:
    """A promotion tonight: no retraining in the same run. The next night's data starts when the champion took
    over, so the feedback gathered under the old champion is not counted (nor exported) again."""
    reg = winning_canary(tmp_path)
    plain_feedback(tmp_path / "events", "x", 12)  # 6 rows, served before the promotion
    settings = make_settings(tmp_path, {"x": {"recipe": str(x_recipe), "min_new_rows": 4}})
    first = run_cycle(settings)
    assert [a.kind for a in first.actions["x"]] == ["promote", "skip"], first
    promoted_at = deploy.cycle.champion_since(reg, "x")
    assert promoted_at is not None and deploy.cycle.training_watermark(settings, reg, "x") == promoted_at.isoformat()
    second = run_cycle(settings)
    assert second.actions["x"] == [CycleAction("skip", f"0 new training rows since {promoted_at.isoformat()} (< 4)")], (
        second
    )
    time.sleep(0.01)
    with EventStore(store_config(tmp_path / "events"), "gw-after", CollectorRegistry()) as store:
        for i in range(8):  # served by the new champion: these count
            rid = f"after-{i}"
            store.submit(RequestEvent(request_id=rid, alias="x", endpoint="completions", prompt=f"q{i}",
                                      completion="ok", latency_ms=5.0, status=200, replica="gw-after"))  # fmt: skip
            store.write_feedback(FeedbackEvent(request_id=rid, kind="thumbs", value=True))
    third = run_cycle(settings)  # enough new rows: retrains (the recipe's base is missing: the run fails)
    assert third.exit_code == ExitCode.FAILED and third.failed["x"].startswith("RunFailed: base model"), third
    runs = RunRecords(settings.runs_path).list("x")
    assert [r["outcome"] for r in runs] == ["failed"]
    assert RunRecords(settings.runs_path).get(runs[0]["run_id"])["since"] == promoted_at.isoformat()


# --- the lock ---------------------------------------------------------------------------------------------


def test_a_second_cycle_is_refused_while_one_holds_the_lock(
    tmp_path: Path, fleets: Fleets, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path, {"x": {"recipe": str(tmp_path / "x.yaml")}})
    config = write_config(tmp_path, {"x": {"recipe": str(tmp_path / "x.yaml")}})
    with cycle_lock(settings.cycle.state_dir):
        with pytest.raises(CycleLocked, match="another cycle is running"):
            run_cycle(settings)
        capsys.readouterr()
        assert cli(["--config", config, "cycle"]) == ExitCode.LOCKED == 75
        assert "loraloop: error: another cycle is running" in capsys.readouterr().err
        assert fleets.made == []  # refused before touching anything
        assert not (tmp_path / "cycle" / "last_cycle.json").exists()
    assert run_cycle(settings).exit_code == ExitCode.OK  # released: the next one runs


# --- the CLI ----------------------------------------------------------------------------------------------


def test_cli_exit_codes(tmp_path: Path, fleets: Fleets, capsys: pytest.CaptureFixture[str]) -> None:
    aliases = {"x": {"recipe": str(tmp_path / "x.yaml"), "min_new_rows": 100_000}}
    config = write_config(tmp_path, aliases)
    assert cli(["--config", config, "cycle"]) == ExitCode.OK
    assert "x: skip: 0 new training rows" in capsys.readouterr().out
    winning_canary(tmp_path)
    assert cli(["--config", config, "cycle"]) == ExitCode.ACTED
    assert "x: promote: candidate wins" in capsys.readouterr().out
    plain_feedback(tmp_path / "events", "broken", 3)
    config = write_config(tmp_path, {**aliases, "broken": {"recipe": str(tmp_path / "nope.yaml"), "min_new_rows": 1}})
    assert cli(["--config", config, "cycle"]) == ExitCode.FAILED
    assert "broken: FAILED RecipeError" in capsys.readouterr().out


# --- the cycle's figures on /metrics --------------------------------------------------------------------------


def test_registry_collector_shows_the_last_success(tmp_path: Path, fleets: Fleets) -> None:
    reg = winning_canary(tmp_path)
    prom = CollectorRegistry()
    prom.register(RegistryCollector(reg.path, tmp_path / "cycle"))
    before = generate_latest(prom).decode()
    assert "\nloraloop_cycle_last_success_timestamp_seconds " not in before  # no cycle yet: no sample
    assert 'loraloop_canary_status{alias="x",version="x-v2"} 1.0' in before
    run_cycle(make_settings(tmp_path, {}))
    after = generate_latest(prom).decode()
    ts = status(tmp_path)["last_success_ts"]
    value = next(float(line.split()[-1]) for line in after.splitlines()
                 if line.startswith("loraloop_cycle_last_success_timestamp_seconds "))  # fmt: skip
    assert value == pytest.approx(ts)
    assert 'loraloop_champion_version{alias="x",version="x-v2"} 2.0' in after
    assert 'loraloop_promotions_total{alias="x"} 1.0' in after and 'loraloop_rollbacks_total{alias="x"} 0.0' in after
    assert "loraloop_canary_status{" not in after


def test_a_timed_out_canary_is_not_a_rollback(tmp_path: Path, fleets: Fleets) -> None:
    reg = registry_with_champion(tmp_path)
    root = tmp_path / "events"
    ctl = PromotionController(reg, FakeFleet(root, {"x": "x-v1"}), root, PromotionConfig(ramp=[0.5]))
    ctl.start_canary("x-v2")
    record(root, {"champion": ArmPlan(200, 100, 0.5), "candidate": ArmPlan(200, 100, 0.5)}, create=False)
    # the canary started now (real time): four days on is past max_duration_h (72), whatever the time of day
    result = run_cycle(make_settings(tmp_path, {}), now=datetime.now(UTC) + timedelta(days=4))
    assert [a.kind for a in result.actions["x"]] == ["timeout"], result
    assert reg.get("x-v2").status == "retired" and reg.get("x-v1").status == "champion"  # no verdict against it
    prom = CollectorRegistry()
    prom.register(RegistryCollector(reg.path, tmp_path / "cycle"))
    assert 'loraloop_rollbacks_total{alias="x"} 0.0' in generate_latest(prom).decode()
