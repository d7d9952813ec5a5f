"""Training on the tiny model with real steps: determinism, resume, layer-wise learning rates, QLoRA, DPO
and the Optuna search."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from retrain.recipe import LoraSection, ModelSection, Recipe, SearchSection, TrainSection
from retrain.train import train_adapter

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def label_rows(tiny_model_dir: Path) -> dict[str, list[dict[str, Any]]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rng = random.Random(0)
    rows = []
    for i in range(40):
        good = i % 2 == 0
        text = f"I {'love' if good else 'hate'} item {rng.randint(0, 999)}"
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        label, other = ("positive", "negative") if good else ("negative", "positive")
        rows.append({"prompt": prompt, "completion": label + "<|im_end|>", "chosen": label + "<|im_end|>",
                     "rejected": other + "<|im_end|>"})  # fmt: skip
    return {"train": rows[:32], "validation": rows[32:]}


def _train(tiny: Path, rows: dict[str, Any], tmp: Path, name: str, **kw: Any) -> Any:
    model = kw.pop("model", ModelSection(base=str(tiny)))
    lora = kw.pop("lora", LoraSection(r=4, alpha=8))
    train = kw.pop("train", TrainSection(max_steps=8, learning_rate=3e-3, batch_size=8))
    return train_adapter(model, lora, train, rows, tmp / name / "adapter", tmp / name / "work", seed=0,
                         report_to=(), **kw)  # fmt: skip


def test_same_seed_same_adapter_bytes(tiny_model_dir: Path, label_rows: Any, tmp_path: Path) -> None:
    a = _train(tiny_model_dir, label_rows, tmp_path, "a")
    b = _train(tiny_model_dir, label_rows, tmp_path, "b")
    assert (a.adapter_dir / WEIGHTS).read_bytes() == (b.adapter_dir / WEIGHTS).read_bytes()
    assert (a.adapter_dir / "adapter_config.json").read_bytes() == (b.adapter_dir / "adapter_config.json").read_bytes()
    assert a.global_step == 8 and a.best_eval_loss is not None and a.train_tokens > 0
    losses = [h["loss"] for h in a.log_history if "loss" in h]
    assert losses[-1] < losses[0]


class _Crash:
    """Raises in the middle of training, after a checkpoint was written."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step >= self.at_step:
            raise RuntimeError("simulated crash")


def test_resume_from_checkpoint(tiny_model_dir: Path, label_rows: Any, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    train = TrainSection(max_steps=8, save_steps=4, learning_rate=3e-3, batch_size=8)
    rows = {"train": label_rows["train"]}
    full = _train(tiny_model_dir, rows, tmp_path, "full", train=train)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(tiny_model_dir, rows, tmp_path, "crash", train=train, callbacks=[_Crash(6)])
    assert (tmp_path / "crash" / "work" / "checkpoint-4").is_dir()
    assert not (tmp_path / "crash" / "adapter").exists()
    resumed = _train(tiny_model_dir, rows, tmp_path, "crash", train=train, resume=True)
    assert resumed.extra["resumed_from"].endswith("checkpoint-4") and resumed.global_step == 8
    a, b = load_file(full.adapter_dir / WEIGHTS), load_file(resumed.adapter_dir / WEIGHTS)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_layers_to_transform_and_layerwise_lr(tiny_model_dir: Path) -> None:
    from retrain.train import attach_lora, layerwise_optimizer, load_base

    model, _ = load_base(ModelSection(base=str(tiny_model_dir)))
    peft_model = attach_lora(model, LoraSection(r=4, alpha=8, layers_to_transform=[1]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.1." in n for n in trainable)
    model2, _ = load_base(ModelSection(base=str(tiny_model_dir)))
    opt = layerwise_optimizer(attach_lora(model2, LoraSection(r=4, alpha=8)),
                              TrainSection(learning_rate=1e-3, layer_lr_decay=0.5, weight_decay=0.01))  # fmt: skip
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 1e-3])
    assert all(g["weight_decay"] == 0.01 for g in opt.param_groups)


def test_layerwise_lr_trains(tiny_model_dir: Path, label_rows: Any, tmp_path: Path) -> None:
    res = _train(tiny_model_dir, label_rows, tmp_path, "lw",
                 train=TrainSection(max_steps=3, learning_rate=3e-3, batch_size=8, layer_lr_decay=0.8))  # fmt: skip
    assert res.global_step == 3 and res.hyperparams["layer_lr_decay"] == 0.8


def test_early_stopping_stops_when_the_validation_loss_rises(
    tiny_model_dir: Path, label_rows: Any, tmp_path: Path
) -> None:
    """Validation rows that contradict the training (each answer swapped): once the model learns the training's
    mapping, the validation loss rises, and patience 1 stops at the first evaluation that is not better, keeping
    the best one (measured: at step 11 of 40). Without early stopping the same run goes all 40 steps."""
    swapped = [{**r, "completion": r["rejected"]} for r in label_rows["validation"]]
    rows = {"train": label_rows["train"], "validation": swapped}
    diverging = {"max_steps": 40, "learning_rate": 1e-2, "batch_size": 8, "eval_every_steps": 1}
    stopped = _train(tiny_model_dir, rows, tmp_path, "es",
                     train=TrainSection(**diverging, early_stopping_patience=1))  # fmt: skip
    evals = [h["eval_loss"] for h in stopped.log_history if "eval_loss" in h]
    first_worse = next(i for i in range(1, len(evals)) if evals[i] >= min(evals[:i]))
    assert stopped.global_step == first_worse + 1 < 40, evals
    assert stopped.best_eval_loss == pytest.approx(min(evals))
    # and the run says why it stopped: the step, the patience, the best loss and whose weights it kept
    why = stopped.extra["stopped_early"]
    assert why["step"] == stopped.global_step and why["max_steps"] == 40 and why["patience"] == 1
    assert why["best_eval_loss"] == pytest.approx(min(evals)) and why["best_step"] == first_worse
    assert why["eval_loss"] == pytest.approx(evals[first_worse])
    assert stopped.hyperparams["stopped_early"] == why["why"] and why["why"].startswith(f"step {first_worse + 1} of 40")
    full = _train(tiny_model_dir, rows, tmp_path, "no-es", train=TrainSection(**diverging))
    assert full.global_step == 40
    assert full.extra["stopped_early"] is None and "stopped_early" not in full.hyperparams


def _lora_outputs(model: Any, ids: Any, train_mode: bool) -> list[Any]:
    import torch

    model.train(train_mode)
    with torch.no_grad():
        return [model(input_ids=ids).logits for _ in range(2)]


def test_lora_dropout_in_the_forward(tiny_model_dir: Path) -> None:
    """With a LoRA dropout two forward passes in train mode differ, and not once it is 0; in eval mode they are
    the same. (lora_B is non-zero here: a fresh adapter's B is 0, which hides the dropout at the first step.)"""
    import torch

    from retrain.train import attach_lora, load_base

    torch.manual_seed(0)
    model = attach_lora(load_base(ModelSection(base=str(tiny_model_dir)))[0], LoraSection(r=4, dropout=0.3))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.tensor([[5, 17, 300, 42, 9, 1200]])
    a, b = _lora_outputs(model, ids, train_mode=True)
    assert not torch.allclose(a, b)
    a, b = _lora_outputs(model, ids, train_mode=False)
    assert torch.equal(a, b)
    dropouts = [m for n, m in model.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
    assert dropouts and {m.p for m in dropouts} == {0.3}
    for m in dropouts:
        m.p = 0.0
    a, b = _lora_outputs(model, ids, train_mode=True)
    assert torch.equal(a, b)  # the difference above is the LoRA dropout's


class _InitialWeights:
    """The trainable weights when training begins."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.dropout = {m.p for n, m in model.named_modules() if "lora_dropout" in n and hasattr(m, "p")}


def test_lora_dropout_changes_the_trained_adapter(tiny_model_dir: Path, label_rows: Any, tmp_path: Path) -> None:
    """Same seed, same data: the adapters start equal and end different with lora.dropout 0.3 vs 0."""
    import torch
    from safetensors.torch import load_file

    starts = {d: _InitialWeights() for d in (0.0, 0.3)}
    train = TrainSection(max_steps=3, learning_rate=3e-3, batch_size=8)
    runs = {d: _train(tiny_model_dir, {"train": label_rows["train"]}, tmp_path, f"d{d}", train=train,
                      lora=LoraSection(r=4, alpha=8, dropout=d), callbacks=[starts[d]]) for d in starts}  # fmt: skip
    assert starts[0.3].dropout == {0.3}  # the trainer keeps the dropout on
    for name, w in starts[0.0].weights.items():
        assert torch.equal(w, starts[0.3].weights[name])
    a, b = (load_file(runs[d].adapter_dir / WEIGHTS) for d in (0.0, 0.3))
    assert a.keys() == b.keys() and any(not torch.allclose(a[k], b[k]) for k in a)


class _SeeModel:
    def __init__(self) -> None:
        self.classes: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.classes = {type(m).__name__ for m in model.modules()}


def test_qlora_nf4_smoke(tiny_model_dir: Path, label_rows: Any, tmp_path: Path) -> None:
    seen = _SeeModel()
    res = _train(tiny_model_dir, {"train": label_rows["train"]}, tmp_path, "q",
                 model=ModelSection(base=str(tiny_model_dir), quantization="nf4"),
                 train=TrainSection(max_steps=2, learning_rate=3e-3, batch_size=8), callbacks=[seen])  # fmt: skip
    assert "Linear4bit" in seen.classes
    assert res.global_step == 2 and (res.adapter_dir / WEIGHTS).stat().st_size > 0
    assert res.hyperparams["quantization"] == "nf4"


def test_dpo_smoke(tiny_model_dir: Path, label_rows: Any, tmp_path: Path) -> None:
    """DPO trains; a LoRA dropout stays on (TRL turns every dropout off by default); the pairs' `weight` is
    not applied, and the run says so."""
    start = _InitialWeights()
    weighted = {split: [{**r, "weight": 2.0 if i % 2 else 0.5} for i, r in enumerate(rows)]
                for split, rows in label_rows.items()}  # fmt: skip
    res = _train(tiny_model_dir, weighted, tmp_path, "dpo", lora=LoraSection(r=4, alpha=8, dropout=0.1),
                 train=TrainSection(method="dpo", max_steps=2, learning_rate=1e-3, batch_size=4),
                 callbacks=[start])  # fmt: skip
    assert res.global_step == 2 and (res.adapter_dir / WEIGHTS).is_file()
    assert any("rewards/margins" in h for h in res.log_history)
    assert res.best_eval_loss is not None
    assert start.dropout == {0.1}
    assert res.hyperparams["row_weights"].startswith("ignored: DPO")


def test_optuna_search_picks_best(tiny_model_dir: Path, label_rows: Any, tmp_path: Path) -> None:
    from retrain.search import run_search

    recipe = Recipe(
        model=ModelSection(base=str(tiny_model_dir)),
        train=TrainSection(max_steps=-1, batch_size=16, learning_rate=1e-3),
        search=SearchSection(enabled=True, n_trials=3, learning_rate=(1e-5, 5e-3), r=[2, 4], epochs=[1.0, 2.0]),
    )
    best, summary = run_search(recipe, label_rows, tmp_path)
    done = [t for t in summary["trials"] if t["state"] == "COMPLETE"]
    assert len(summary["trials"]) == 3 and done
    assert summary["best_value"] == min(t["value"] for t in done)
    assert all(t["intermediate"] for t in done)  # validation losses were reported while training
    chosen = tmp_path / "trials" / f"trial-{summary['best_trial']}" / "adapter" / WEIGHTS
    assert (best.adapter_dir / WEIGHTS).read_bytes() == chosen.read_bytes()
    assert best.adapter_dir == tmp_path / "adapter"
