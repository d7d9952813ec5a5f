"""Training: peft LoRA (or QLoRA) on the base, with TRL's SFTTrainer or DPOTrainer (built in ``retrain.trainer``;
padding-free rows attend per sequence with ``retrain.attention``).

``train_adapter`` gets only what it needs — the ``model``, ``lora`` and ``train`` sections, the rows, a
seed and an output directory — and returns the saved adapter with its training history."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.progress import is_terminal
from retrain.recipe import LoraSection, ModelSection, TrainSection
from retrain.row_weights import WeightPlan, plan_weights, row_weight
from retrain.trainer import dpo_trainer, early_stopping_callback, sft_trainer, training_args

_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class TrainResult:
    """What a training produced."""

    adapter_dir: Path
    log_history: list[dict[str, Any]]
    hyperparams: dict[str, Any]
    global_step: int
    duration_s: float
    train_tokens: int
    best_eval_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / self.duration_s if self.duration_s > 0 else 0.0


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run torch with ``n`` threads inside the block (None: leave it)."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def library_bars_unless_terminal() -> None:
    """transformers, datasets and the hub draw tqdm bars (loading weights, tokenizing, the Trainer's steps):
    carriage-return frames that pile up in a cron mail, a CI log or `kubectl logs`. Off unless stderr is a
    terminal; the Trainer's per-step loss lines remain the progress there."""
    if is_terminal(sys.stderr):
        return
    import datasets
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


def load_base(model_cfg: ModelSection) -> tuple[Any, Any]:
    """The base model (maybe 4-bit NF4) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = Path(model_cfg.base)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"base model {model_cfg.base!r} not found (no config.json)")
    dtype = getattr(torch, model_cfg.dtype)
    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    kwargs: dict[str, Any] = {"dtype": dtype}
    if model_cfg.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if model_cfg.quantization == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, tok


def attach_lora(model: Any, lora: LoraSection, warm_start: Path | None = None) -> Any:
    """Wrap ``model`` in a PeftModel: a fresh LoRA, or the weights of ``warm_start`` loaded trainable."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if warm_start is not None:
        return PeftModel.from_pretrained(model, str(warm_start), is_trainable=True)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        layers_to_transform=lora.layers_to_transform, bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(model, config)


def layerwise_optimizer(model: Any, train: TrainSection) -> Any:
    """AdamW with one param group per decoder layer: layer i of n gets lr * decay**(n-1-i)."""
    import torch

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    depths = [int(m.group(1)) for n, _ in params if (m := _LAYER.search(n))]
    top = max(depths) if depths else 0
    groups: dict[int, list[Any]] = {}
    for name, p in params:
        m = _LAYER.search(name)
        groups.setdefault(int(m.group(1)) if m else top, []).append(p)
    param_groups = [
        {
            "params": ps,
            "lr": train.learning_rate * train.layer_lr_decay ** (top - d),
            "weight_decay": train.weight_decay,
        }
        for d, ps in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=train.learning_rate)


def _dataset(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, weights: bool = False) -> Any:
    """The rows' text ``columns`` as a datasets.Dataset, and their loss ``weight`` when ``weights``."""
    import datasets

    data: dict[str, list[Any]] = {c: [str(r[c]) for r in rows] for c in columns}
    if weights:
        data["weight"] = [row_weight(r) for r in rows]
    return datasets.Dataset.from_dict(data)


def last_checkpoint(out: Path) -> Path | None:
    """The newest ``checkpoint-N`` directory under ``out``, if any."""
    found = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name[11:].isdigit() else -1)
    return found[-1] if found else None


def finalize_adapter(src_model: Any, out_dir: Path, base: str) -> Path:
    """Save the adapter as safetensors with a byte-stable config naming ``base`` as its base model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    src_model.save_pretrained(str(out_dir), safe_serialization=True)
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base)
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    readme = out_dir / "README.md"
    if readme.exists():
        readme.unlink()  # peft's generic card; retrain.modelcard writes the real one
    return out_dir


def train_adapter(
    model_cfg: ModelSection,
    lora: LoraSection,
    train: TrainSection,
    rows: Mapping[str, Sequence[dict[str, Any]]],
    out_dir: Path,
    work_dir: Path,
    *,
    seed: int,
    warm_start: Path | None = None,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    report_to: Sequence[str] = ("tensorboard",),
    epochs: float | None = None,
) -> TrainResult:
    """Train one adapter and save it to ``out_dir``; checkpoints and logs go to ``work_dir``.

    ``rows``: ``train`` and ``validation`` lists of SFT rows (``prompt``, ``completion``, optional ``weight``:
    ``retrain.row_weights``) or preference pairs (``prompt``, ``chosen``, ``rejected``) for DPO. ``resume``
    continues from the newest checkpoint in ``work_dir`` (Trainer's resume_from_checkpoint)."""
    from transformers import set_seed

    started = time.monotonic()
    library_bars_unless_terminal()
    work_dir.mkdir(parents=True, exist_ok=True)
    epochs = train.epochs if epochs is None else epochs
    cols = ["prompt", "completion"] if train.method == "sft" else ["prompt", "chosen", "rejected"]
    train_rows, val_rows = list(rows.get("train", [])), list(rows.get("validation", []))
    if not train_rows:
        raise ValueError("no training rows")
    weights = plan_weights(train_rows, train)
    with torch_threads(train.torch_threads), _env(TENSORBOARD_LOGGING_DIR=str(work_dir / "tensorboard")):
        set_seed(seed)
        model, tok = load_base(model_cfg)
        model = attach_lora(model, lora, warm_start)
        train_ds = _dataset(train_rows, cols, weights=weights.apply)
        eval_ds = _dataset(val_rows, cols) if val_rows else None  # no weights: the validation loss is a plain mean
        args_kw = training_args(train, work_dir, seed=seed, has_eval=eval_ds is not None, report_to=report_to,
                                epochs=epochs)  # fmt: skip
        cbs = list(callbacks)
        stopper = None
        if train.early_stopping_patience and eval_ds is not None:
            stopper = early_stopping_callback(train.early_stopping_patience)
            cbs.append(stopper)
        optimizers: tuple[Any, Any] = (None, None)
        if train.layer_lr_decay != 1.0:
            optimizers = (layerwise_optimizer(model, train), None)
        trainer: Any
        if train.method == "sft":
            trainer = sft_trainer(model, tok, train, args_kw, train_ds, eval_ds, weighted=weights.apply,
                                  callbacks=cbs, optimizers=optimizers)  # fmt: skip
        else:
            trainer = dpo_trainer(model, tok, train, lora, args_kw, train_ds, eval_ds, callbacks=cbs,
                                  optimizers=optimizers)  # fmt: skip
        ckpt = last_checkpoint(work_dir) if resume else None
        out = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        finalize_adapter(trainer.model, out_dir, model_cfg.base)
    tokens = _count_tokens(trainer, train.method) * max(1, round(out.metrics.get("epoch", epochs) or 1))
    history = list(trainer.state.log_history)
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    hyper = _hyperparams(model_cfg, lora, train, epochs=epochs, seed=seed, warm_start=warm_start, weights=weights)
    stopped = stopper.stopped if stopper is not None else None
    if stopped is not None:
        hyper["stopped_early"] = stopped["why"]
    return TrainResult(
        adapter_dir=out_dir, log_history=history, hyperparams=hyper, global_step=int(trainer.state.global_step),
        duration_s=time.monotonic() - started, train_tokens=tokens, best_eval_loss=min(evals) if evals else None,
        extra={"train_metrics": dict(out.metrics), "resumed_from": str(ckpt) if ckpt else None,
               "stopped_early": stopped},
    )  # fmt: skip


def _hyperparams(
    model_cfg: ModelSection, lora: LoraSection, train: TrainSection, *, epochs: float, seed: int,
    warm_start: Path | None, weights: WeightPlan,
) -> dict[str, Any]:  # fmt: skip
    return {
        "method": train.method, "learning_rate": train.learning_rate, "epochs": epochs, "max_steps": train.max_steps,
        "batch_size": train.batch_size, "grad_accum": train.grad_accum, "weight_decay": train.weight_decay,
        "lr_scheduler": train.lr_scheduler, "warmup_ratio": train.warmup_ratio, "layer_lr_decay": train.layer_lr_decay,
        "packing": train.packing, "padding_free": train.padding_free, "group_by_length": train.group_by_length,
        "r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
        "target_modules": list(lora.target_modules), "layers_to_transform": lora.layers_to_transform,
        "quantization": model_cfg.quantization, "warm_start": str(warm_start) if warm_start else None, "seed": seed,
        "early_stopping_patience": train.early_stopping_patience, "row_weights": weights.note,
    }  # fmt: skip


def _count_tokens(trainer: Any, method: str) -> int:
    ds = trainer.train_dataset
    try:
        if method == "sft":
            return int(sum(len(x) for x in ds["input_ids"]))
        return int(sum(len(a) + len(b) + 2 * len(p) for p, a, b in
                       zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=False)))  # fmt: skip
    except (KeyError, TypeError, ValueError):
        return 0


__all__ = [
    "TrainResult", "attach_lora", "finalize_adapter", "last_checkpoint", "layerwise_optimizer", "load_base",
    "train_adapter",
]  # fmt: skip
