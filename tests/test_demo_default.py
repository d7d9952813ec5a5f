"""`loraloop demo` with no options: the default path is SmolLM2-135M (tests/test_demo.py runs the tiny preset).

A whole SmolLM2 demo takes up to 15 minutes here, so the real run below is the default path shortened through
DemoConfig: the smollm2 preset prepared where the demo keeps it, vLLM and the gateway started on it, the held-out
rate measured, users' traffic and feedback sent and stored, the nightly cycle run (too little feedback for a
training: it skips), the final measurement and the report. Training on SmolLM2 is the one stage it leaves out;
the recipe the demo would train with is loaded and checked instead."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from core import paths
from deploy.cli import main
from deploy.demo import DemoConfig, DemoResult, _recipe, _settings, run_demo
from feedback.reader import StoreReader
from retrain.recipe import load_recipe


def test_demo_defaults_to_smollm2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The command line's defaults reach run_demo as the smollm2 preset and its own working directory (run_demo
    is replaced here only to catch the configuration it is given; the run itself is the next tests')."""
    seen: list[DemoConfig] = []

    def fake_run(cfg: DemoConfig) -> DemoResult:
        seen.append(cfg)
        return DemoResult(before_rate=0.1, after_rate=0.9, promoted="reviews-v1")

    monkeypatch.setattr("deploy.demo.run_demo", fake_run)
    assert main(["demo"]) == 0 and "demo succeeded" in capsys.readouterr().out
    assert main(["demo", "--aa"]) == 1  # A/A must promote nothing: a promotion is a failed A/A demo
    (cfg, aa) = seen
    assert (cfg.preset, cfg.aa, cfg.workdir) == ("smollm2", False, paths.STATE_ROOT / "demo-smollm2")
    assert (aa.preset, aa.aa, aa.workdir) == ("smollm2", True, paths.STATE_ROOT / "demo-smollm2-aa")
    assert cfg == DemoConfig(workdir=cfg.workdir)  # every other knob at the DemoConfig defaults


def test_smollm2_recipe_and_settings_are_valid(tmp_path: Path) -> None:
    """What the smollm2 demo's cycle trains with: the shipped SFT recipe, made gentler for a real model; it loads
    as a recipe and the demo's settings validate around it."""
    cfg = DemoConfig(workdir=tmp_path)
    recipe = load_recipe(_recipe(cfg, "/models/smollm2", tmp_path))
    assert recipe.model.base == "/models/smollm2" and recipe.train.method == "sft"
    assert (recipe.train.learning_rate, recipe.train.max_steps, recipe.train.torch_threads) == (1.0e-3, 30, None)
    assert recipe.data.prepare.min_rows == 20 and recipe.eval.max_tokens == 6
    settings = _settings(cfg, "/models/smollm2", tmp_path)
    spec = settings.cycle.aliases[cfg.alias]
    assert load_recipe(spec.recipe) == recipe and spec.min_new_rows == 20
    assert settings.backends.mode == "managed" and settings.store.export_lag_s == 0
    assert settings.promotion.max_duration_h == 24.0 * cfg.rounds - 1


@pytest.mark.integration
@pytest.mark.slow
def test_default_demo_path_runs_on_smollm2(tmp_path: Path) -> None:
    cfg = DemoConfig(workdir=tmp_path / "demo", users=4, baseline_requests=8, rounds=1, round_requests=8, holdout=4,
                     concurrency=4)  # fmt: skip
    assert cfg.preset == "smollm2" and cfg.vllm_url is None  # the default: SmolLM2 on a managed vLLM
    started = time.monotonic()
    result = run_demo(cfg)
    print(f"shortened smollm2 demo: {time.monotonic() - started:.0f} s")
    work = tmp_path / "demo"
    # SmolLM2 never answers with the house label on its own, and nothing was trained: the same answers after
    assert result.before_rate == result.after_rate < 0.5 and result.promoted is None and result.decisions == []
    # the traffic and the feedback are in the event store
    con = StoreReader(work / "events").connect()
    try:
        served = con.execute("SELECT count(*) FROM requests WHERE alias = 'reviews' AND status = 200").fetchone()
        answers = [r[0] for r in con.execute("SELECT completion FROM requests WHERE alias = 'reviews'").fetchall()]
        thumbs = con.execute("SELECT count(*) FROM feedback WHERE kind = 'thumbs' AND matched").fetchone()
    finally:
        con.close()
    assert served == (cfg.holdout * 2 + cfg.baseline_requests,) and thumbs == (cfg.baseline_requests,)
    # real SmolLM2 weights, served right: its answers take up the question's words ("The verdict is positive.
    # The", measured), which random or mis-loaded weights never write
    echoing = [a for a in answers if re.search(r"\b(verdict|review)\b", a or "", re.IGNORECASE)]
    assert len(echoing) >= 0.9 * len(answers), answers
    # the cycle ran on that store and found too little to train on
    status = json.loads((work / "cycle" / "last_cycle.json").read_text())
    assert not status.get("failed"), status
    assert "new training rows" in json.dumps(status["actions"]), status
    report = (work / "report.md").read_text()
    assert report.startswith("# loraloop demo — smollm2") and "promoted: **nothing**" in report
    assert (work / "before_after.png").stat().st_size > 1000
    # the model it served is the smollm2 preset, prepared where `loraloop demo` keeps it
    model = Path("~/.cache/loraloop/models/smollm2").expanduser()
    assert (model / "config.json").is_file() and json.loads((model / "config.json").read_text())["hidden_size"] == 576
