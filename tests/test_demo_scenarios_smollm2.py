"""`loraloop demo --scenario tools|open` as shipped, on SmolLM2-135M: the figures the README quotes.

Marked `smollm2` (not in the default run: each is a whole demo, 10–15 minutes here). Run them with
`pytest -m smollm2 tests/test_demo_scenarios_smollm2.py`. The tiny model's run of the same plumbing is in the
default suite (tests/test_demo.py::test_demo_tools_scenario_end_to_end)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.demo import DemoConfig, run_demo

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.smollm2]


def test_tools_scenario_learns_the_convention_and_promotes(tmp_path: Path) -> None:
    result = run_demo(DemoConfig.for_scenario("tools", workdir=tmp_path / "demo"))
    print(f"tools: exact match {result.metrics_before} -> {result.metrics_after}, {result.elapsed_s / 60:.1f} min")
    assert result.before_rate <= 0.2  # SmolLM2 never writes the house convention (it rarely calls a tool at all)
    assert result.after_rate >= 0.8 and result.promoted == "tools-v1"
    assert result.gate is not None and result.gate["passed"] and result.gate["primary_metric"] == "tool_exact_match"
    assert "tool-call exact match on 40 held-out support requests" in (tmp_path / "demo" / "report.md").read_text()


def test_open_scenario_learns_the_style_and_reports_the_judge(tmp_path: Path) -> None:
    result = run_demo(DemoConfig.for_scenario("open", workdir=tmp_path / "demo"))
    print(f"open: {result.metrics_before} -> {result.metrics_after}, judge {result.comparison}, "
          f"{result.elapsed_s / 60:.1f} min")  # fmt: skip
    assert result.after_rate >= result.before_rate + 0.3 and result.promoted == "open-v1"
    judge = result.comparison
    assert judge["judge_asked"] == 2 * 24 and judge["judge_win_rate_low"] <= judge["judge_win_rate_high"]
    assert result.gate is not None and "judge" in result.gate["evaluators"]
    assert "Wilson interval" in (tmp_path / "demo" / "report.md").read_text()


def test_tools_scenario_aa_promotes_nothing(tmp_path: Path) -> None:
    result = run_demo(DemoConfig.for_scenario("tools", aa=True, workdir=tmp_path / "demo"))
    assert result.promoted is None and all(d["action"] != "promote" for d in result.decisions)
