"""The demo's loop end to end, shortened, on the tiny model and the session's vLLM: the preferred-answer
rate rises and the candidate is promoted; the A/A mode promotes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.registry import Registry, RegistryConfig
from deploy.demo import DemoConfig, run_demo
from tests.conftest import LiveGateway

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def short(tmp_path: Path, live: LiveGateway, **kw: object) -> DemoConfig:
    vllm = f"http://127.0.0.1:{live.settings.backends.managed.port}"
    return DemoConfig(preset="tiny", workdir=tmp_path / "demo", users=24, baseline_requests=96, rounds=4,
                      round_requests=48, holdout=24, vllm_url=vllm, **kw)  # type: ignore[arg-type]  # fmt: skip


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
