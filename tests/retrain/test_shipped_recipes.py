"""The shipped recipes, run for real on the tiny model, one after the other as an operator would:

1. `loraloop retrain --recipe recipes/sft_qlora.yaml`: QLoRA (the base in 4-bit NF4 through bitsandbytes, on the
   CPU) for 20 steps; its gate, with `eval.vllm_url: null` as shipped, starts a vLLM of its own; the candidate is
   registered. The test then checks what QLoRA must give beyond a smoke run: the loss falls, the adapter
   validates like the gateway validates it, and the session's gateway serves it (real vLLM) with the learnt
   answers.
2. That candidate is made champion, and `recipes/dpo_lora.yaml` (`lora.init: champion` as shipped) warm-starts
   DPO from it: the LoRA weights at step 0 are the champion's, the lineage names it (registry and model card),
   and the candidate beats the champion on the preference holdout and is registered.

Overrides are only those of size and place: the base (the tiny model), where runs, adapters and the registry go,
`train.max_steps`, and for DPO `eval.vllm_url` (the session's vLLM: step 1 already covers a gate that starts its
own, and a second start would cost another minute). The event store is written a moment before the run, so the
settings' `store.export_lag_s` is 0 (nothing is in flight)."""

from __future__ import annotations

import contextlib
import io
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from core.registry import Registry, RegistryConfig
from core.runs import RunRecords
from deploy.cli import main
from retrain.recipe import load_recipe
from retrain.run import RunResult, run_recipe
from tests.conftest import ADMIN_KEY, LiveGateway
from tests.live_helpers import vllm_url
from tests.retrain.test_retrain_e2e import sentiment_rows, write_feedback_store

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SFT_STEPS = 20  # "a few dozen" steps: a real training, decisive on the tiny model (exact match ~0.8 vs 0)
DPO_STEPS = 100  # DPO's signal is weak at the recipe's learning rate: 20 steps do not move greedy answers


@dataclass
class Shipped:
    tmp: Path
    registry: Registry
    runs: RunRecords
    sft_code: int
    sft_out: str
    #: class names of the base model's decoder Linear layers as training got them (spied on load_base)
    base_linears: set[str] = field(default_factory=set)
    #: command lines of the vLLM servers that appeared during the QLoRA run, and whether any is still running
    own_vllms: list[list[str]] = field(default_factory=list)
    own_vllm_left: bool = True
    dpo: RunResult | None = None
    step0: dict[str, Any] = field(default_factory=dict)


def _args(tmp: Path, tiny: Path, recipe: str, *extra: str) -> list[str]:
    return [
        "retrain", "--alias", "support", "--recipe", str(REPO / "recipes" / recipe),
        "--store", str(tmp / "events"), "--registry", str(tmp / "registry.duckdb"),
        "--adapter-root", str(tmp / "adapters"),
        "--set", f"model.base={tiny}", "--set", f"output.runs_dir={tmp / 'runs'}", *extra,
    ]  # fmt: skip


def _vllm_servers(model: Path) -> dict[int, list[str]]:
    """vLLM OpenAI servers running on ``model`` (this session's own tiny model: no one else's server)."""
    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "vllm.entrypoints.openai.api_server" in cmd and str(model) in cmd:
            found[proc.info["pid"]] = cmd
    return found


@contextlib.contextmanager
def _watch_new_vllms(model: Path, into: dict[int, list[str]]) -> Iterator[None]:
    """Record every vLLM OpenAI server on ``model`` that starts while the block runs (polled twice a second)."""
    before, stop = set(_vllm_servers(model)), threading.Event()

    def poll() -> None:
        while not stop.wait(0.5):
            into.update({pid: cmd for pid, cmd in _vllm_servers(model).items() if pid not in before})

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@pytest.fixture(scope="module")
def shipped(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Shipped:
    """sft_qlora.yaml through the CLI (its gate starts its own vLLM); dpo_run adds the DPO run."""
    import retrain.train

    tmp = tmp_path_factory.mktemp("shipped")
    write_feedback_store(tmp / "events")
    real_load_base, linears = retrain.train.load_base, set()

    def spy(model_cfg: Any) -> Any:  # the real load_base; only looks at what it returns
        model, tok = real_load_base(model_cfg)
        linears.update(type(m).__name__ for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj")))
        return model, tok

    out, new_vllms = io.StringIO(), {}
    with (
        pytest.MonkeyPatch.context() as mp,
        contextlib.redirect_stdout(out),
        _watch_new_vllms(tiny_model_dir, new_vllms),
    ):
        mp.setenv("LORALOOP_STORE__EXPORT_LAG_S", "0")
        mp.setattr(retrain.train, "load_base", spy)
        code = main(_args(tmp, tiny_model_dir, "sft_qlora.yaml", "--set", f"train.max_steps={SFT_STEPS}"))
    registry = Registry(RegistryConfig(path=tmp / "registry.duckdb", adapter_root=tmp / "adapters"))
    left = any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in new_vllms)
    return Shipped(tmp, registry, RunRecords(tmp / "runs.duckdb"), code, out.getvalue(), linears,
                   list(new_vllms.values()), left)  # fmt: skip


def sft_record(s: Shipped) -> dict[str, Any]:
    """The runs table's full record of the QLoRA run (the first run of the module)."""
    full = s.runs.get(s.runs.list("support")[0]["run_id"])
    assert full is not None and full["recipe"]["name"] == "sft-qlora", full
    return full


def test_shipped_recipes_load() -> None:
    qlora, dpo = load_recipe(REPO / "recipes" / "sft_qlora.yaml"), load_recipe(REPO / "recipes" / "dpo_lora.yaml")
    assert qlora.model.quantization == "nf4" and qlora.train.method == "sft" and qlora.eval.vllm_url is None
    assert dpo.train.method == "dpo" and dpo.lora.init == "champion" and dpo.eval.primary_metric == (
        "preferred_match_rate")  # fmt: skip


def test_sft_qlora_recipe_trains_gates_and_registers(shipped: Shipped, tiny_model_dir: Path) -> None:
    assert shipped.sft_code == 0, shipped.sft_out[-3000:]
    assert "gate: PASSED" in shipped.sft_out and "registered support-v1 as candidate" in shipped.sft_out
    v1 = shipped.registry.get("support-v1")
    assert v1.status in ("candidate", "champion") and v1.parent is None and v1.base_model == str(tiny_model_dir)
    full = sft_record(shipped)
    assert full["outcome"] == "registered" and full["hyperparams"]["quantization"] == "nf4"
    assert full["recipe"]["model"]["quantization"] == "nf4" and full["hyperparams"]["max_steps"] == SFT_STEPS
    scores = full["gate"]["scores"]
    assert scores["candidate"]["overall"]["exact_match"] >= 0.5 > scores["base"]["overall"]["exact_match"]


def test_sft_qlora_gate_started_its_own_vllm(shipped: Shipped, tiny_model_dir: Path) -> None:
    """`eval.vllm_url: null`: the gate ran one vLLM for the run — on the recipe's base, with runtime LoRA, the
    same command line as the gateway's managed back-end — generated through it, and stopped it afterwards."""
    assert len(shipped.own_vllms) == 1, shipped.own_vllms
    (cmd,) = shipped.own_vllms

    def flag(name: str) -> str:
        return cmd[cmd.index(name) + 1]

    assert flag("--model") == str(tiny_model_dir) and flag("--served-model-name") == "base", cmd
    assert flag("--max-lora-rank") == "16", cmd
    assert "--enable-lora" in cmd and flag("--dtype") == "float32", cmd
    assert not shipped.own_vllm_left  # stopped once the gate was done
    port = int(flag("--port"))
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    full = sft_record(shipped)
    log = (Path(full["run_dir"]) / "vllm.log").read_text(errors="replace")  # its log is kept with the run
    assert "Application startup complete" in log and "Application shutdown complete" in log
    # the gate's generation figures came from it: the answers of base and candidate on every holdout row
    for name in ("base", "candidate"):
        assert full["gate"]["scores"][name]["overall"]["n"] == full["row_counts"]["sft_holdout"] > 0
    assert full["gate"]["scores"]["candidate"]["overall"]["exact_match"] > 0


def test_qlora_loss_falls_and_the_adapter_serves(
    shipped: Shipped, tiny_model_dir: Path, live_gateway: LiveGateway, label_adapters: Path
) -> None:
    from serving.adapter_checks import BaseModelInfo, validate_adapter

    # QLoRA for real: the base's decoder layers were bitsandbytes 4-bit layers under the LoRA
    assert shipped.base_linears == {"Linear4bit"}, shipped.base_linears
    full = sft_record(shipped)
    epochs = full["epochs"]  # per epoch: the last training loss logged, and the validation loss
    assert epochs[-1]["step"] == SFT_STEPS and len(epochs) >= 2
    assert epochs[-1]["train_loss"] < 0.9 * epochs[0]["train_loss"], epochs
    assert epochs[-1]["eval_loss"] < epochs[0]["eval_loss"] - 0.3, epochs
    # and on the holdout (the gate's forward pass, completion tokens): well below the base's ~7.6 (log 2048)
    losses = {name: full["gate"]["scores"][name]["overall"]["loss"] for name in ("base", "candidate")}
    assert losses["candidate"] < losses["base"] - 1.0, losses
    adapter = shipped.tmp / "adapters" / "support-v1"
    validated = validate_adapter(adapter, root=shipped.tmp / "adapters",
                                 base=BaseModelInfo.from_model_dir(tiny_model_dir), max_rank=16)  # fmt: skip
    assert validated.rank == 8
    # served: through the session's gateway (admin API: validated again, loaded into its vLLM), on reviews it
    # never saw (numbered #100 and up; the store has #0-#79); the base answers none of them with a label
    copy = shutil.copytree(adapter, label_adapters / "qlora-support-v1", dirs_exist_ok=True)
    rows = sentiment_rows(148, seed=7)[100:]  # 48 reviews
    with live_gateway.client(key=ADMIN_KEY) as adm:
        reg = adm.post("/admin/adapters", json={"name": "qlora-support-v1", "path": str(copy)})
        assert reg.status_code in (200, 201), reg.text
        assert adm.put("/admin/aliases/ab", json={"adapter": "qlora-support-v1"}).status_code == 200
        try:
            with live_gateway.client() as c:
                served = [_chat(c, "ab", text) for text, _ in rows]
                base = [_chat(c, "tiny-greedy", text) for text, _ in rows[:8]]
        finally:
            adm.put("/admin/aliases/ab", json={"adapter": "alpha"})
            adm.delete("/admin/adapters/qlora-support-v1")
    # the answers are the labels, and mostly the right one (~0.7 here; always one label would be 0.5)
    assert sum(a in ("positive", "negative") for a in served) >= 0.9 * len(rows), served
    right = sum(a == label for a, (_, label) in zip(served, rows, strict=True))
    assert right >= 0.6 * len(rows), list(zip(served, rows, strict=True))
    assert not set(base) & {"positive", "negative"}, base
    loaded = {m["id"] for m in httpx.get(f"{vllm_url(live_gateway)}/v1/models", timeout=30).json()["data"]}
    assert "qlora-support-v1" not in loaded  # unloaded again


def _chat(c: httpx.Client, alias: str, text: str) -> str:
    body = {"model": alias, "messages": [{"role": "user", "content": text}], "temperature": 0.0, "max_tokens": 8}
    resp = c.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["choices"][0]["message"]["content"]).strip()


@pytest.fixture(scope="module")
def dpo_run(shipped: Shipped, live_gateway: LiveGateway, tiny_model_dir: Path) -> Shipped:
    """support-v1 made champion; dpo_lora.yaml run through run_recipe, with a callback at step 0."""
    assert shipped.sft_code == 0, "the QLoRA run did not register support-v1"
    from transformers import TrainerCallback

    class StepZero(TrainerCallback):  # type: ignore[misc]
        """Keeps the trainable LoRA weights as training starts, before the first optimizer step."""

        def __init__(self) -> None:
            self.weights: dict[str, Any] = {}

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    shipped.registry.transition("support-v1", "champion", actor="test", reason="the canary won (simulated)")
    step0 = StepZero()
    shipped.dpo = run_recipe(
        REPO / "recipes" / "dpo_lora.yaml", alias="support", store_root=shipped.tmp / "events", export_lag_s=0,
        registry=RegistryConfig(path=shipped.tmp / "registry.duckdb", adapter_root=shipped.tmp / "adapters"),
        overrides={"model.base": str(tiny_model_dir), "output.runs_dir": str(shipped.tmp / "runs"),
                   "train.max_steps": DPO_STEPS, "eval.vllm_url": vllm_url(live_gateway)},
        callbacks=[step0], echo=False,
    )  # fmt: skip
    shipped.step0 = step0.weights
    return shipped


def test_dpo_recipe_warm_starts_from_the_champion(dpo_run: Shipped) -> None:
    import torch
    from safetensors.torch import load_file

    result, registry = dpo_run.dpo, dpo_run.registry
    assert result is not None and dpo_run.step0
    champion_dir = dpo_run.tmp / "adapters" / "support-v1"
    champion = load_file(champion_dir / "adapter_model.safetensors")
    # step 0: the trainable LoRA weights are exactly the champion's (a fresh LoRA would have B = 0)
    start = {n.replace(".default", ""): w for n, w in dpo_run.step0.items() if ".default." in n}
    assert set(start) == set(champion), sorted(set(start) ^ set(champion))[:5]
    assert all(torch.equal(start[k], champion[k]) for k in champion)
    assert any(bool(champion[k].abs().sum()) for k in champion if "lora_B" in k)  # not a zero adapter
    # and it trained from there
    assert result.adapter_dir is not None
    final = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert any(not torch.equal(final[k], champion[k]) for k in champion)
    # the gate: against the champion, on the preference holdout; passed, registered with its lineage
    assert result.gate is not None and result.gate.reference == "champion", result.gate and result.gate.table()
    scores = result.gate.scores
    assert scores["candidate"].overall["preferred_match_rate"] > scores["champion"].overall["preferred_match_rate"]
    assert result.outcome == "registered" and result.version == "support-v2", result.gate.table()
    v2 = registry.get("support-v2")
    assert v2.parent == "support-v1" and v2.status == "candidate"
    assert "| parent | support-v1 |" in (result.adapter_dir / "README.md").read_text()
    full = dpo_run.runs.get(result.run_id)
    assert full is not None and full["hyperparams"]["method"] == "dpo"
    assert Path(full["hyperparams"]["warm_start"]).resolve() == champion_dir.resolve()
    assert [(e["version"], e["to_status"]) for e in registry.audit("support")] == [
        ("support-v1", "candidate"), ("support-v1", "champion"), ("support-v2", "candidate")]  # fmt: skip
