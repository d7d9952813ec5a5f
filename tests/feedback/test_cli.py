"""The `report`, `experiments`, `export` and `events` subcommands, through the CLI's main (its errors and exit
codes), on a real store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from core.errors import ExitCode
from core.store_config import StoreConfig
from deploy.cli import main
from feedback.cli import parse_arm
from feedback.events import FeedbackEvent
from feedback.experiments import ExperimentRepo
from feedback.store import EventStore
from tests.feedback.conftest import make_request


def _run(root: Path, *argv: str) -> int:
    config = root.parent / "cli-settings.yaml"
    config.write_text(yaml.safe_dump({"store": {"root": str(root), "export_lag_s": 0}}))
    return main(["--config", str(config), *argv])


def test_parse_arm():
    assert parse_arm("control").adapter is None and parse_arm("control").weight == 1.0
    arm = parse_arm("lora=my-adapter:3")
    assert (arm.name, arm.adapter, arm.weight) == ("lora", "my-adapter", 3.0)
    assert parse_arm("b=base:0.5").adapter is None
    with pytest.raises(ValueError):
        parse_arm("=x")


def test_experiment_lifecycle_report_export_and_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert (
        _run(
            tmp_path,
            "experiments",
            "create",
            "--alias",
            "default",
            "--arm",
            "control",
            "--arm",
            "lora=ad1:1",
            "--id",
            "exp-cli",
            "--p95-max-ms",
            "900",
        )
        == 0
    )
    assert "created experiment exp-cli" in capsys.readouterr().out
    assert _run(tmp_path, "experiments", "create", "--alias", "default", "--arm", "x") == ExitCode.USAGE
    err = capsys.readouterr().err
    assert err.startswith("loraloop: error: ") and err.count("\n") == 1

    exp = ExperimentRepo(tmp_path).get("exp-cli")
    with EventStore(StoreConfig(root=tmp_path), "gw") as s:
        for i in range(20):
            arm = "control" if i % 2 else "lora"
            s.submit(make_request(i, experiment_id=exp.id, arm=arm))
            s.write_feedback(FeedbackEvent(request_id=f"r{i}", kind="thumbs", value=i % 3 == 0))
    assert _run(tmp_path, "experiments", "update", "exp-cli", "--weight", "lora=3", "--error-rate-max", "0.1") == 0
    assert "v2" in capsys.readouterr().out
    assert ExperimentRepo(tmp_path).get("exp-cli").guardrails.p95_latency_ms_max == 900
    assert _run(tmp_path, "experiments", "list", "--json") == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed[0]["id"] == "exp-cli" and listed[0]["arms"][1]["weight"] == 3.0

    plot = tmp_path / "r.png"
    assert _run(tmp_path, "report", "exp-cli", "--plot", str(plot)) == 0
    out = capsys.readouterr().out
    assert "experiment exp-cli" in out and "decision" in out and plot.is_file()
    assert _run(tmp_path, "report", "missing") == ExitCode.USAGE
    assert "no experiment" in capsys.readouterr().err

    assert _run(tmp_path, "export", "--out", str(tmp_path / "x")) == 0
    out = capsys.readouterr().out
    assert "exported 7 sft rows" in out and "watermark" in out
    assert _run(tmp_path, "export", "--since", str(tmp_path / "x"), "--out", str(tmp_path / "y")) == 0
    assert "exported 0 sft rows" in capsys.readouterr().out

    assert _run(tmp_path, "events", "status") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["rows"]["requests"] == 20 and status["pending_feedback"] == 0 and status["schema_version"] == 3
    assert _run(tmp_path, "events", "migrate") == 0
    assert "schema 3 -> 3" in capsys.readouterr().out
    assert _run(tmp_path, "experiments", "stop", "exp-cli") == 0
    assert ExperimentRepo(tmp_path).get("exp-cli").status == "stopped"
