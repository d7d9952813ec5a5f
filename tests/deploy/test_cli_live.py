"""`loraloop adapters`, `loraloop canary` and `loraloop registry` run for real: the CLI's `main` against the
session's gateway (admin API, real vLLM) and a real DuckDB registry, and what they change is checked where it
shows — in the answers the alias gives and in the registry — not in the command's output alone."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from core.registry import Registry, RegistryConfig
from deploy.admin_client import GatewayError, GatewayFleet
from deploy.cli import main as cli
from feedback.experiments import ExperimentRepo
from tests.conftest import ADMIN_KEY, LiveGateway
from tests.live_helpers import vllm_url

pytestmark = pytest.mark.integration

ALIAS = "ab"  # served by `alpha` in the session's gateway; only tests/test_feedback_live.py also uses it


def answer(live: LiveGateway, user: str = "cli-user") -> tuple[str, httpx.Response]:
    with live.client() as c:
        resp = c.post(
            "/v1/chat/completions",
            json={"model": ALIAS, "user": user, "messages": [{"role": "user", "content": "Label this."}]},
        )
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"], resp


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def config(live_gateway: LiveGateway, label_adapters: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
           ) -> Iterator[Path]:  # fmt: skip
    """Settings for the CLI: this machine's gateway is the session's (so `adapters` needs no --url), a fresh
    registry, the gateway's event store. Afterwards the alias serves `alpha` again and every adapter and
    experiment this test added is gone from the gateway."""
    cfg = tmp_path / "loraloop.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": str(live_gateway.settings.model), "host": "127.0.0.1", "port": live_gateway.settings.port,
        "adapter_root": str(label_adapters), "registry_path": str(tmp_path / "registry.duckdb"),
        "store": {"root": str(live_gateway.settings.store.root)},
        "promotion": {"gateway_urls": [live_gateway.url], "ramp": [0.5]},
    }))  # fmt: skip
    monkeypatch.setenv("LORALOOP_ADMIN_KEY", ADMIN_KEY)
    fleet = GatewayFleet([live_gateway.url], ADMIN_KEY, timeout_s=120)
    repo = ExperimentRepo(live_gateway.settings.store.root, refresh_s=0)
    existing = {e.id for e in repo.list(ALIAS)}
    try:
        yield cfg
    finally:
        for exp in repo.list(ALIAS):
            if exp.id not in existing and exp.status == "running":
                fleet.stop_experiment(exp.id)
        fleet.point(ALIAS, "alpha")
        for name in ("cli-bravo", "ab-v1", "ab-v2"):
            with contextlib.suppress(GatewayError):  # not registered (any more): nothing to clean
                fleet.replicas[0].unload_adapter(name)
        fleet.close()


def test_adapters_register_list_point_unload(
    config: Path, live_gateway: LiveGateway, label_adapters: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = ["--config", str(config), "adapters"]
    path = shutil.copytree(label_adapters / "bravo", label_adapters / "cli-bravo", dirs_exist_ok=True)
    assert answer(live_gateway)[0] == "alpha"

    code, out, err = run(capsys, *c, "register", "cli-bravo", str(path))
    assert code == 0, err
    assert '"cli-bravo"' in out
    code, out, err = run(capsys, *c, "list")
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("cli-bravo "))
    assert f"{vllm_url(live_gateway)}: loaded" in line and "r=8" in line, line
    assert f"alias {ALIAS} -> alpha" in out.splitlines()
    models = httpx.get(f"{vllm_url(live_gateway)}/v1/models", timeout=30).json()["data"]
    assert "cli-bravo" in {m["id"] for m in models}  # really loaded in vLLM

    code, _, err = run(capsys, *c, "point", ALIAS, "cli-bravo")
    assert code == 0, err
    text, resp = answer(live_gateway)
    assert text == "bravo" and resp.headers["x-loraloop-adapter"] == "cli-bravo"
    _, out, _ = run(capsys, *c, "list")
    assert f"alias {ALIAS} -> cli-bravo" in out.splitlines()
    assert next(x for x in out.splitlines() if x.startswith("cli-bravo ")).split("aliases=")[1].startswith(ALIAS)

    code, _, err = run(capsys, *c, "unload", "cli-bravo")  # still serves the alias: refused, one line
    assert code == 1 and "still serves alias(es) ab" in err and len(err.strip().splitlines()) == 1, err
    assert answer(live_gateway)[0] == "bravo"

    code, _, err = run(capsys, *c, "point", ALIAS, "base")
    assert code == 0, err
    text, resp = answer(live_gateway)
    assert resp.headers["x-loraloop-adapter"] == "base" and text not in ("alpha", "bravo")
    code, _, err = run(capsys, *c, "unload", "cli-bravo")
    assert code == 0, err
    _, out, _ = run(capsys, *c, "list")
    assert not [x for x in out.splitlines() if x.startswith("cli-bravo ")]
    models = httpx.get(f"{vllm_url(live_gateway)}/v1/models", timeout=30).json()["data"]
    assert "cli-bravo" not in {m["id"] for m in models}  # unloaded from vLLM too

    # an explicit --url, and a gateway that is not there: one line, exit 1
    code, _, err = run(capsys, *c, "--url", "http://127.0.0.1:9", "list")
    assert code == 1 and err.startswith("loraloop: error: cannot reach the gateway at http://127.0.0.1:9"), err


def test_canary_start_evaluate_and_registry(
    config: Path, live_gateway: LiveGateway, label_adapters: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    c = ["--config", str(config)]
    registry = Registry(RegistryConfig(path=tmp_path / "registry.duckdb", adapter_root=label_adapters))
    for n, source in ((1, "alpha"), (2, "bravo")):
        shutil.copytree(label_adapters / source, label_adapters / f"ab-v{n}", dirs_exist_ok=True)
        registry.register_candidate(ALIAS, label_adapters / f"ab-v{n}", base_model=str(live_gateway.settings.model))
    registry.transition("ab-v1", "champion", actor="test", reason="initial champion")

    code, out, err = run(capsys, *c, "canary", "start", "ab-v2")
    assert code == 0, err
    assert out.strip() == "canary canary-ab-v2 running on ab"
    assert registry.get("ab-v2").status == "canary"
    # real traffic is split between the champion (ab-v1 = alpha) and the candidate (ab-v2 = bravo)
    seen = {}
    for i in range(16):
        text, resp = answer(live_gateway, user=f"cli-canary-{i}")
        arm = resp.headers["x-loraloop-arm"]
        assert (arm, text, resp.headers["x-loraloop-adapter"]) in {("champion", "alpha", "ab-v1"),
                                                                   ("candidate", "bravo", "ab-v2")}  # fmt: skip
        seen[arm] = seen.get(arm, 0) + 1
    assert set(seen) == {"champion", "candidate"}, seen
    code, _, err = run(capsys, *c, "canary", "start", "ab-v2")  # not a candidate any more: refused
    assert code == 2 and "is canary, not a candidate" in err, err

    live_gateway.app.state.store.flush()
    code, out, err = run(capsys, *c, "canary", "evaluate", ALIAS, "--json")
    assert code == 0, err
    first, _, figures = out.partition("\n")
    assert first.startswith("continue: keep running"), out
    fig = json.loads(figures)
    assert fig["experiment"] == "canary-ab-v2" and fig["share"] == 0.5
    assert (fig["champion"]["requests"], fig["candidate"]["requests"]) == (seen["champion"], seen["candidate"])

    # past promotion.max_duration_h without a win: the CLI's evaluation stops the canary, the champion stays
    monkeypatch.setenv("LORALOOP_PROMOTION__MAX_DURATION_H", "0.00001")
    code, out, err = run(capsys, *c, "canary", "evaluate", ALIAS)
    assert code == 0, err
    assert out.startswith("timeout: no win after"), out
    assert registry.get("ab-v2").status == "retired" and registry.get("ab-v1").status == "champion"
    repo = ExperimentRepo(live_gateway.settings.store.root, refresh_s=0)
    assert repo.get("canary-ab-v2").status == "stopped"
    code, out, _ = run(capsys, *c, "canary", "evaluate", ALIAS)
    assert (code, out.strip()) == (0, "no running canary")

    code, out, err = run(capsys, *c, "registry", "list", "--alias", ALIAS)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()]
    assert [(r[0], r[1]) for r in rows] == [("ab-v1", "champion"), ("ab-v2", "retired")], out
    code, out, err = run(capsys, *c, "registry", "audit", "--alias", ALIAS)
    assert code == 0, err
    audit = [line.split(" ", 2)[2] for line in out.splitlines()]
    assert [" ".join(a.split()[:4]) for a in audit] == [
        "ab-v1 - -> candidate", "ab-v2 - -> candidate", "ab-v1 candidate -> champion",
        "ab-v2 candidate -> canary", "ab-v2 canary -> retired",
    ], out  # fmt: skip
    assert "by operator: canary at 50%" in audit[3] and "by operator: no win after" in audit[4], out
    code, out, _ = run(capsys, *c, "registry", "list", "--alias", "no-such-alias")
    assert (code, out) == (0, "")
