"""Promotion and rollback through the real gateway and vLLM, under concurrent streaming and non-streaming
load: a canary of `bravo` against the champion `alpha` on alias `labeler` wins on feedback given through
POST /v1/feedback, is promoted without a failed request, then rolled back (controller and CLI)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from core.deploy_config import CanaryGuardrails, PromotionConfig
from core.registry import Registry, RegistryConfig
from deploy.admin_client import GatewayFleet
from deploy.cli import main as cli
from deploy.controller import PromotionController
from feedback.experiments import ExperimentRepo
from serving.registry_metrics import RegistryCollector
from tests.conftest import ADMIN_KEY, LiveGateway
from tests.test_adapters_live import Load, Outcome, one_request

pytestmark = pytest.mark.integration
T = TypeVar("T")

ALIAS = "labeler"
ANSWER = {"champion": "alpha", "candidate": "bravo"}
CFG = PromotionConfig(
    ramp=[0.5], min_samples=15, certainty=0.9, step_min_requests=100_000, max_duration_h=72,
    guardrails=CanaryGuardrails(min_requests=10),
)  # fmt: skip


@dataclass
class Setup:
    registry: Registry
    fleet: GatewayFleet
    controller: PromotionController
    store_root: Path
    adapter_root: Path


@pytest.fixture
def setup(live_gateway: LiveGateway, label_adapters: Path, tiny_model_dir: Path, tmp_path: Path) -> Iterator[Setup]:
    """A fresh registry: labeler-v1 (a copy of alpha) champion and served by the alias, labeler-v2 (a copy of
    bravo) candidate. Afterwards: every experiment it started is stopped and the alias points where it was."""
    for n, source in ((1, "alpha"), (2, "bravo"), (3, "bravo")):
        shutil.copytree(label_adapters / source, label_adapters / f"{ALIAS}-v{n}", dirs_exist_ok=True)
    registry = Registry(RegistryConfig(path=tmp_path / "registry.duckdb", adapter_root=label_adapters))
    for n in (1, 2):
        registry.register_candidate(ALIAS, label_adapters / f"{ALIAS}-v{n}", base_model=str(tiny_model_dir))
    registry.transition(f"{ALIAS}-v1", "champion", actor="test", reason="initial champion")
    fleet = GatewayFleet([live_gateway.url], ADMIN_KEY, timeout_s=120)
    store_root = live_gateway.settings.store.root
    found = fleet.alias_targets(ALIAS)[live_gateway.url]
    fleet.register_adapter(f"{ALIAS}-v1", str(label_adapters / f"{ALIAS}-v1"))
    fleet.point(ALIAS, f"{ALIAS}-v1")
    controller = PromotionController(registry, fleet, store_root, CFG)
    repo = ExperimentRepo(store_root, refresh_s=0)
    existing = {e.id for e in repo.list(ALIAS)}
    try:
        yield Setup(registry, fleet, controller, store_root, label_adapters)
    finally:
        for exp in repo.list(ALIAS):
            if exp.id not in existing and exp.status == "running":
                fleet.stop_experiment(exp.id)
        fleet.point(ALIAS, found)
        fleet.close()


def chat(client: httpx.Client, user: str) -> tuple[str, str, str]:
    """(request id, arm, answer) of one non-streaming request of `user`."""
    body = {"model": ALIAS, "user": user, "messages": [{"role": "user", "content": "Label this one."}]}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    text = resp.json()["choices"][0]["message"]["content"]
    return resp.headers["x-request-id"], resp.headers.get("x-loraloop-arm", ""), text


def rate_many_users(live: LiveGateway, users: int) -> dict[str, list[bool]]:
    """One request per user on the canary, then thumbs through POST /v1/feedback: up when the answer is
    "bravo", down for "alpha" — every eighth user votes the other way (unanimous votes: see
    test_controller_decisions.test_unanimous_feedback_promotes)."""

    def one(i: int) -> tuple[str, bool]:
        user = f"canary-user-{i}"
        with live.client() as client:
            rid, arm, text = chat(client, user)
            assert text == ANSWER[arm], (arm, text)  # the arm's adapter really served it
            up = (text == "bravo") != (i % 8 == 7)
            fb = client.post("/v1/feedback", json={"request_id": rid, "kind": "thumbs", "value": up, "user": user})
            assert fb.status_code == 201, fb.text
        return arm, up

    votes: dict[str, list[bool]] = {"champion": [], "candidate": []}
    with ThreadPoolExecutor(4) as pool:
        for arm, up in pool.map(one, range(users)):
            votes[arm].append(up)
    return votes


AFTER = 8  # requests that must start after the switch and finish before the load stops


def under_load(live: LiveGateway, action: Callable[[], T]) -> tuple[T, float, Load]:
    """Run `action()` while 4 workers send streaming and non-streaming requests; returns its result, the time it
    returned and the load. Waits on conditions, not fixed sleeps: the load is under way before the action (some
    requests done, others in flight), and AFTER requests that started after it have finished before it stops."""
    with Load(live, ALIAS, workers=4) as load:
        load.wait_for(4, started_after=0)
        result = action()
        done = time.monotonic()
        load.wait_for(AFTER, started_after=done)
    return result, done, load


def check_load(load: Load, done: float, expected: str) -> list[Outcome]:
    assert load.errors == [], load.errors[:3]
    failed = [o for o in load.outcomes if o.status != 200]
    assert failed == [], failed[:3]
    assert {o.stream for o in load.outcomes} == {True, False}
    after = [o for o in load.outcomes if o.started > done]
    assert len(after) >= AFTER, f"only {len(after)} requests started after the switch"
    wrong = [(o.text, o.stream) for o in after if o.text != expected]
    assert wrong == [], f"started after the switch but not answered by {expected}: {wrong}"
    return after


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def collect(registry_path: Path, cycle_dir: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    prom = CollectorRegistry()
    prom.register(RegistryCollector(registry_path, cycle_dir))
    return scrape(generate_latest(prom).decode())


def test_canary_promote_and_rollback_under_load(
    setup: Setup, live_gateway: LiveGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    reg, ctl, fleet = setup.registry, setup.controller, setup.fleet
    v1, v2, v3 = (f"{ALIAS}-v{n}" for n in (1, 2, 3))

    # --- canary ---------------------------------------------------------------------------------------------
    exp = ctl.start_canary(v2)
    assert exp.id == f"canary-{v2}" and exp.status == "running" and exp.alias == ALIAS
    assert {a.name: (a.adapter, a.weight) for a in exp.arms} == {"champion": (v1, 0.5), "candidate": (v2, 0.5)}
    assert reg.get(v2).status == "canary" and ctl.running_canary(ALIAS) is not None
    canary_metrics = collect(reg.path, tmp_path / "cycle")
    assert canary_metrics[("loraloop_canary_status", (("alias", ALIAS), ("version", v2)))] == 1.0
    assert canary_metrics[("loraloop_champion_version", (("alias", ALIAS), ("version", v1)))] == 1.0
    votes = rate_many_users(live_gateway, 64)
    assert len(votes["candidate"]) >= 20 and len(votes["champion"]) >= 20, {k: len(v) for k, v in votes.items()}

    # --- promote under load -----------------------------------------------------------------------------------
    decision, promoted_at, load = under_load(live_gateway, lambda: ctl.evaluate(ALIAS))
    assert decision is not None and decision.action == "promote", decision
    check_load(load, promoted_at, "bravo")
    assert {o.text for o in load.outcomes} <= {"alpha", "bravo"}
    figures = decision.figures
    for arm in ("champion", "candidate"):
        assert figures[arm]["rated"] == len(votes[arm]), (arm, figures[arm])
        assert figures[arm]["thumbs_up"] == sum(votes[arm])
        assert figures[arm]["requests"] >= len(votes[arm])
    assert figures["candidate"]["metric"] > figures["champion"]["metric"]
    assert ExperimentRepo(setup.store_root, refresh_s=0).get(exp.id).status == "stopped"
    assert fleet.alias_targets(ALIAS) == {live_gateway.url: v2}
    assert reg.get(v2).status == "champion" and reg.get(v1).status == "retired"
    audit = reg.audit(ALIAS)
    to_champion = next(e for e in audit if e["version"] == v2 and e["to_status"] == "champion")
    retired = next(e for e in audit if e["version"] == v1 and e["to_status"] == "retired")
    assert to_champion["from_status"] == "canary" and to_champion["actor"] == "promotion-controller"
    assert to_champion["figures"]["candidate"]["rated"] == len(votes["candidate"])
    assert retired["figures"] == to_champion["figures"] and v2 in retired["reason"]

    # --- rollback (controller) under load ----------------------------------------------------------------------
    reinstated, rolled_back_at, load = under_load(live_gateway, lambda: ctl.rollback(ALIAS, reason="test rollback"))
    assert reinstated is not None and reinstated.version == v1
    check_load(load, rolled_back_at, "alpha")
    assert reg.get(v1).status == "champion" and reg.get(v2).status == "rejected"
    assert fleet.alias_targets(ALIAS) == {live_gateway.url: v1}
    assert [(e["version"], e["from_status"], e["to_status"]) for e in reg.audit(ALIAS)[-2:]] == [
        (v2, "champion", "rejected"), (v1, "retired", "champion"),
    ]  # fmt: skip

    # --- rollback through the CLI, after a manual promotion of v3 ---------------------------------------------
    reg.register_candidate(ALIAS, setup.adapter_root / v3, base_model="tiny")
    fleet.register_adapter(v3, str(setup.adapter_root / v3))
    fleet.point(ALIAS, v3)
    reg.transition(v3, "champion", actor="operator", reason="manual promotion")
    config = tmp_path / "loraloop.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(live_gateway.settings.model), "aliases": {ALIAS: {}},
        "adapter_root": str(setup.adapter_root), "registry_path": str(reg.path),
        "store": {"root": str(setup.store_root)}, "promotion": {"gateway_urls": [live_gateway.url]},
    }))  # fmt: skip
    monkeypatch.setenv("LORALOOP_ADMIN_KEY", ADMIN_KEY)
    capsys.readouterr()
    # how long this takes is measured against a bare repoint in bench/rollback.py, not asserted here
    code = cli(["--config", str(config), "rollback", ALIAS, "--reason", "cli test"])
    out = capsys.readouterr()
    assert code == 0, out
    assert out.out.strip() == f"{ALIAS} now serves {v1}"
    assert reg.get(v1).status == "champion" and reg.get(v3).status == "rejected"
    last = reg.audit(ALIAS)[-1]
    assert last["actor"] == "operator" and "cli test" in last["reason"]
    with live_gateway.client() as client:
        for stream in (False, True):
            out_req = one_request(client, ALIAS, "Label this one.", stream)
            assert (out_req.status, out_req.text) == (200, "alpha")

    # --- registry metrics ---------------------------------------------------------------------------------------
    expected = {
        ("loraloop_champion_version", (("alias", ALIAS), ("version", v1))): 1.0,
        ("loraloop_promotions_total", (("alias", ALIAS),)): 1.0,  # v2: canary -> champion
        ("loraloop_rollbacks_total", (("alias", ALIAS),)): 2.0,  # v2 then v3: champion -> rejected
    }
    direct = collect(reg.path, tmp_path / "cycle")
    assert {k: direct.get(k) for k in expected} == expected, direct
    assert not any(name == "loraloop_canary_status" for name, _ in direct)
    # the gateway's own /metrics reads settings.registry_path: point its collector at this registry
    gateway_registry = live_gateway.app.state.metrics.registry
    collectors = [c for c in gateway_registry._collector_to_names if isinstance(c, RegistryCollector)]
    assert len(collectors) == 1
    monkeypatch.setattr(collectors[0], "registry_path", reg.path)
    with live_gateway.client() as client:
        served = scrape(client.get("/metrics").text)
    assert {k: served.get(k) for k in expected} == expected
