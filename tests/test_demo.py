"""The demo's loop end to end, shortened, on the tiny model and the session's vLLM: the preferred-answer
rate rises and the candidate is promoted; the A/A mode promotes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.registry import Registry, RegistryConfig
from deploy.demo import DemoConfig, run_demo
from feedback.reader import StoreReader
from tests.conftest import LiveGateway

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def short(tmp_path: Path, live: LiveGateway, **kw: object) -> DemoConfig:
    vllm = f"http://127.0.0.1:{live.settings.backends.managed.port}"
    knobs: dict[str, object] = {"users": 24, "baseline_requests": 96, "rounds": 4, "round_requests": 48,
                                "holdout": 24, **kw}  # fmt: skip
    return DemoConfig(preset="tiny", workdir=tmp_path / "demo", vllm_url=vllm, **knobs)  # type: ignore[arg-type]


def test_demo_loop_promotes_a_better_adapter(
    tmp_path: Path, live_gateway: LiveGateway, capfd: pytest.CaptureFixture[str]
) -> None:
    result = run_demo(short(tmp_path, live_gateway, alias="reviews"))
    out, progress = capfd.readouterr()  # stderr is not a terminal: whole lines, no carriage-return frames
    print(out)  # the demo's own story, for a failure's report
    assert "\r" not in progress and "baseline traffic: 96/96 req (100%)" in progress
    assert result.before_rate < 0.2
    assert result.promoted is not None and result.promoted.startswith("reviews-v")
    assert result.after_rate >= result.before_rate + 0.5
    registry = Registry(RegistryConfig(path=tmp_path / "demo" / "registry.duckdb"))
    assert registry.champion("reviews") is not None and registry.champion("reviews").version == result.promoted
    statuses = [(e["from_status"], e["to_status"]) for e in registry.audit("reviews")]
    assert statuses == [(None, "candidate"), ("candidate", "canary"), ("canary", "champion")]
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "promoted: **reviews-v1**" in report
    assert (tmp_path / "demo" / "before_after.png").stat().st_size > 1000
    assert (tmp_path / "demo" / "canary.png").stat().st_size > 1000


def test_demo_aa_promotes_nothing(tmp_path: Path, live_gateway: LiveGateway) -> None:
    result = run_demo(short(tmp_path, live_gateway, alias="reviews-aa", aa=True))
    assert result.promoted is None
    assert result.decisions and all(d["action"] != "promote" for d in result.decisions)
    registry = Registry(RegistryConfig(path=tmp_path / "demo" / "registry.duckdb"))
    assert registry.champion("reviews-aa") is None
    assert registry.list("reviews-aa")[0].status == "retired"  # timed out: the champion stayed


def test_demo_tools_scenario_end_to_end(tmp_path: Path, live_gateway: LiveGateway) -> None:
    """`--scenario tools` on the tiny model, through the session's vLLM (pythonic tool-call parser): the requests
    offer the tools, corrected calls are accepted as feedback, the export has tool rows rendered with the
    serving template, the gate runs the tool-call evaluator on them, and the report shows the tool metrics. The
    tiny model learns no convention worth promoting: the plumbing is what is checked here (the SmolLM2 figures:
    tests/test_demo_scenarios_smollm2.py)."""
    cfg = short(tmp_path, live_gateway, scenario="tools", alias="tools", baseline_requests=64, rounds=1,
                round_requests=16, holdout=8)  # fmt: skip
    result = run_demo(cfg)
    work = tmp_path / "demo"
    con = StoreReader(work / "events").connect()
    try:
        served = con.execute(
            "SELECT count(*) FROM requests WHERE alias = 'tools' AND json_array_length(tools) = 3"
        ).fetchone()
        corrections = con.execute(
            "SELECT count(*) FROM feedback WHERE kind = 'correction' AND matched AND value->>'$.tool_calls[0].name' "
            "IN ('lookup_order', 'refund', 'escalate')"
        ).fetchone()
    finally:
        con.close()
    assert served == (cfg.holdout * 2 + cfg.baseline_requests + (cfg.round_requests if result.decisions else 0),)
    assert corrections is not None and corrections[0] >= cfg.baseline_requests // 2  # the base is never right
    rows = [json.loads(line) for f in work.glob("runs/*/data/sft.jsonl") for line in f.read_text().splitlines()]
    tool_rows = [r for r in rows if r["tools"] and r["completion_tool_calls"]]
    assert len(tool_rows) >= cfg.baseline_requests // 2
    assert {json.loads(c["arguments"])["order_id"][:4] for r in tool_rows for c in r["completion_tool_calls"]} == {
        "ORD-"
    }
    gate = result.gate
    assert gate is not None and gate["primary_metric"] == "tool_exact_match"
    assert gate["evaluators"]["tool_calls"]["rows"] > 0 and "tool_exact_match" in gate["scores"]["candidate"]["overall"]
    assert (result.scenario, set(result.metrics_before)) == (
        "tools", {"tool_exact_match", "valid_call_rate", "tool_name_accuracy"}
    )  # fmt: skip
    report = (work / "report.md").read_text()
    assert f"tool-call exact match on {cfg.holdout} held-out support requests: before" in report
    assert "valid-call rate: before" in report and "## Gate" in report and "tool_exact_match" in report
    assert (work / "before_after.png").stat().st_size > 1000
