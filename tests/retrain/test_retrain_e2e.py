"""End to end: synthetic feedback in a real event store -> `loraloop retrain` in-process -> the candidate
beats the base on the holdout through the session's vLLM and is registered; a broken run changes nothing."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from core.errors import ExitCode
from core.registry import Registry, RegistryConfig
from core.settings import Settings
from core.store_config import StoreConfig
from deploy.cli import main
from feedback.events import FeedbackEvent, RequestEvent
from feedback.store import EventStore

REPO = Path(__file__).resolve().parents[2]
_GOOD = ["love", "great", "wonderful", "excellent", "happy with"]
_BAD = ["hate", "awful", "terrible", "broken", "angry about"]
_THINGS = ["the phone", "my order", "the service", "this laptop", "the delivery", "the app", "the price", "support"]


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(user text, label) pairs whose label depends on the text."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        good = i % 2 == 0
        word = rng.choice(_GOOD if good else _BAD)
        out.append((f"I {word} {rng.choice(_THINGS)} #{i}", "positive" if good else "negative"))
    return out


def write_feedback_store(root: Path, n: int = 80, *, alias: str = "support", seed: int = 0) -> Path:
    """A real store with request events and feedback: a third of the answers right and thumbed up, the rest
    wrong and corrected by the user (label in the metadata, for per-slice metrics)."""
    cfg = StoreConfig(root=root, fsync=False, flush_interval_s=0.01)
    with EventStore(cfg, "w1", registry=CollectorRegistry()) as store:
        for i, (text, label) in enumerate(sentiment_rows(n, seed)):
            right = i % 3 == 0
            other = "negative" if label == "positive" else "positive"
            rid = f"req-{seed}-{i}"
            store.submit(RequestEvent(
                request_id=rid, alias=alias, endpoint="chat", messages=[{"role": "user", "content": text}],
                completion=label if right else other, latency_ms=5.0, status=200, replica="w1",
            ))  # fmt: skip
            meta = {"task": "sentiment", "label": label}
            if right:
                store.write_feedback(FeedbackEvent(request_id=rid, kind="thumbs", value=True, metadata=meta))
            else:
                store.write_feedback(FeedbackEvent(request_id=rid, kind="correction", value=label, metadata=meta))
        store.flush()
    return root


def retrain_args(tmp: Path, tiny: Path, *extra: str, recipe: str = "sft_lora.yaml") -> list[str]:
    return [
        "retrain", "--alias", "support", "--recipe", str(REPO / "recipes" / recipe),
        "--store", str(tmp / "events"), "--registry", str(tmp / "state" / "registry.duckdb"),
        "--adapter-root", str(tmp / "adapters"),
        "--set", f"model.base={tiny}", "--set", f"output.runs_dir={tmp / 'runs'}",
        "--set", "data.prepare={min_rows: 10}", "--set", "eval.min_slice_samples=3",
        "--set", "data.lag_s=0",  # the store was written a moment ago: nothing is in flight
        *extra,
    ]  # fmt: skip


def snapshot(tmp: Path) -> dict[str, Any]:
    reg = Registry(RegistryConfig(path=tmp / "state" / "registry.duckdb", adapter_root=tmp / "adapters"))
    root = tmp / "adapters"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []
    return {"versions": [v.model_dump() for v in reg.list()], "audit": reg.audit(), "files": files}


@pytest.mark.integration
def test_retrain_beats_base_and_registers(tmp_path: Path, tiny_model_dir: Path, live_gateway: Any,
                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from core.runs import RunRecords
    from serving.adapter_checks import BaseModelInfo, validate_adapter

    write_feedback_store(tmp_path / "events")
    url = f"http://127.0.0.1:{live_gateway.settings.backends.managed.port}"
    code = main(retrain_args(tmp_path, tiny_model_dir, "--set", f"eval.vllm_url={url}"))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "gate: PASSED" in out and "registered support-v1 as candidate" in out
    reg = Registry(RegistryConfig(path=tmp_path / "state" / "registry.duckdb", adapter_root=tmp_path / "adapters"))
    v = reg.get("support-v1")
    assert v.status == "candidate" and v.base_model == str(tiny_model_dir) and v.recipe_hash and v.data_watermark
    assert v.metrics["exact_match"] > 0.5
    adir = tmp_path / "adapters" / "support-v1"
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= {p.name for p in adir.iterdir()}
    validate_adapter(adir, root=tmp_path / "adapters", base=BaseModelInfo.from_model_dir(tiny_model_dir), max_rank=16)
    card = (adir / "README.md").read_text()
    assert "Evaluation gate" in card and "PASSED" in card and "exported_sft" in card
    run = RunRecords(tmp_path / "state" / "runs.duckdb").list("support")[-1]
    assert run["outcome"] == "registered" and run["adapter_version"] == "support-v1"
    full = RunRecords(tmp_path / "state" / "runs.duckdb").get(run["run_id"])
    assert full is not None and full["gate"]["passed"] and full["row_counts"]["exported_sft"] == 80
    assert full["epochs"] and full["hyperparams"]["r"] == 8
    gate = full["gate"]["scores"]
    assert gate["candidate"]["overall"]["exact_match"] > gate["base"]["overall"]["exact_match"]
    assert gate["candidate"]["overall"]["loss"] < gate["base"]["overall"]["loss"]
    run_dir = Path(full["run_dir"])
    assert (run_dir / "training_curve.png").stat().st_size > 1000
    assert list((run_dir / "checkpoints" / "tensorboard").glob("events.out.tfevents.*"))
    # the eval adapters were unloaded from vLLM
    import httpx

    models = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    assert not [m for m in models if m.startswith("eval-")]


def test_broken_runs_change_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    from core.runs import RunRecords

    write_feedback_store(tmp_path / "events", n=30)
    before = snapshot(tmp_path)
    # a missing base
    assert main(retrain_args(tmp_path, tmp_path / "no-such-model")) == 2
    # training raises (a learning rate that the recipe accepts but a LoRA rank over the model's size)
    code = main(retrain_args(tmp_path, tiny_model_dir, "--set", "lora.target_modules=[no_such_module]",
                             "--set", "eval.skip_generation=true"))  # fmt: skip
    assert code == 1
    assert snapshot(tmp_path) == before
    runs = RunRecords(tmp_path / "state" / "runs.duckdb").list("support")
    assert [r["outcome"] for r in runs] == ["failed", "failed"]


def test_rerun_same_data_same_seed_same_adapter(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Two runs of the same recipe on the same data (same watermark) give the same adapter bytes and figures."""
    from core.runs import RunRecords

    write_feedback_store(tmp_path / "events", n=40)
    extra = ("--set", "eval.skip_generation=true", "--set", "eval.primary_metric=neg_loss",
             "--set", "train.max_steps=10", "--since", "start")  # fmt: skip
    assert main(retrain_args(tmp_path, tiny_model_dir, *extra)) == 0
    assert main(retrain_args(tmp_path, tiny_model_dir, *extra)) == 0
    root = tmp_path / "adapters"
    w = "adapter_model.safetensors"
    assert (root / "support-v1" / w).read_bytes() == (root / "support-v2" / w).read_bytes()
    records = RunRecords(tmp_path / "state" / "runs.duckdb")
    runs = [records.get(r["run_id"]) for r in records.list("support")]
    assert [r["outcome"] for r in runs if r] == ["registered", "registered"]
    a, b = (r["eval"]["candidate"] for r in runs if r)
    assert a["loss"] == b["loss"] and runs[0]["recipe_hash"] == runs[1]["recipe_hash"]  # type: ignore[index]


def test_a_quiet_night_is_a_clean_skip(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fewer rows than min_rows after preparation: exit 4, the run recorded as skipped (not failed), nothing
    trained or registered, and its watermark not used by the next run; only the alias's own rows count."""
    from core.runs import RunRecords
    from deploy.cycle import last_watermark

    write_feedback_store(tmp_path / "events", n=12)
    write_feedback_store(tmp_path / "events", n=60, alias="other", seed=1)  # another alias: not support's data
    before = snapshot(tmp_path)
    code = main(retrain_args(tmp_path, tiny_model_dir, "--set", "data.prepare={min_rows: 20}"))
    out = capsys.readouterr().out
    assert code == ExitCode.NOT_ENOUGH_DATA == 4, out
    assert "skipped, nothing trained:" in out and "fewer than min_rows=20" in out
    run = RunRecords(tmp_path / "state" / "runs.duckdb").list("support")[-1]
    full = RunRecords(tmp_path / "state" / "runs.duckdb").get(run["run_id"])
    assert full is not None and full["outcome"] == "skipped" and "min_rows=20" in full["error"]
    assert not (Path(full["run_dir"]) / "adapter").exists() and snapshot(tmp_path) == before
    settings = Settings(registry_path=tmp_path / "state" / "registry.duckdb")
    assert last_watermark(settings, "support") is None  # the next night starts from the same place
    exported = Path(full["run_dir"]) / "data" / "manifest.json"
    assert json.loads(exported.read_text())["counts"] == {"sft": 12, "pairs": 8}  # support's rows only


def test_retrain_in_a_log_file_writes_lines_not_bars(tmp_path: Path, tiny_model_dir: Path) -> None:
    """In cron or CI (output not a terminal) no progress bar draws carriage-return frames; the per-step loss
    lines are the progress."""
    import subprocess
    import sys

    write_feedback_store(tmp_path / "events", n=40)
    argv = retrain_args(tmp_path, tiny_model_dir, "--set", "eval.skip_generation=true", "--set", "train.max_steps=4",
                        "--set", "eval.primary_metric=neg_loss")  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "deploy.cli", *argv], cwd=REPO, capture_output=True,
                          timeout=600)  # bytes: text mode would turn the frames' \r into newlines  # fmt: skip
    output = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, output[-3000:]
    assert b"\r" not in proc.stdout + proc.stderr
    assert output.count("'loss':") >= 4 and "registered support-v1" in output
