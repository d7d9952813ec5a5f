"""Training: peft LoRA (or QLoRA) on the base, with TRL's SFTTrainer or DPOTrainer.

``train_adapter`` gets only what it needs — the ``model``, ``lora`` and ``train`` sections, the rows, a
seed and an output directory — and returns the saved adapter with its training history."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from core.progress import is_terminal
from retrain.recipe import LoraSection, ModelSection, TrainSection

log = logging.getLogger(__name__)

_LAYER = re.compile(r"\.layers\.(\d+)\.")
VARLEN_ATTENTION = "loraloop_sdpa_varlen"
_BOUNDS: list[Any] = [None, None]  # (the tensor the sequence bounds were read from, the bounds)


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


def _sequence_bounds(query: Any, key: Any, attention_mask: Any, is_causal: bool, kwargs: Mapping[str, Any]) -> Any:
    """Where each sequence of a padding-free row starts and ends (``[0, s1, ..., T]``), or None when the row is not
    several sequences laid end to end (a padded batch, one sequence, decoding with a cache)."""
    import torch

    length = query.shape[2]
    if attention_mask is not None or not is_causal or query.shape[0] != 1 or key.shape[2] != length:
        return None
    cu = kwargs.get("cu_seq_lens_q")  # TRL's padding-free collator computes them
    source = cu if cu is not None else kwargs.get("position_ids")
    if source is None:
        return None
    if _BOUNDS[0] is source:  # every layer of a forward gets the same tensor: one device-to-host copy
        bounds = _BOUNDS[1]
    elif cu is not None:
        bounds = [int(x) for x in cu.tolist()]
    elif source.shape[-1] == length:
        pos = source.reshape(-1, length)[0]  # a new sequence wherever the position does not go up by one
        starts = (torch.nonzero(pos[1:] - pos[:-1] != 1).flatten() + 1).tolist()
        bounds = [0, *starts, length]
    else:
        return None
    _BOUNDS[:] = [source, bounds]
    if len(bounds) <= 2 or bounds[0] != 0 or bounds[-1] != length:
        return None
    return bounds


def varlen_sdpa_attention(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
    scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any,
) -> tuple[Any, None]:  # fmt: skip
    """SDPA that keeps the sequences of a padding-free / packed row apart without a ``T x T`` mask.

    transformers' sdpa builds a block-diagonal ``T x T`` mask from packed ``position_ids`` (correct, but quadratic
    in the whole row: a packed batch of 16 x 512 tokens is an 8192 x 8192 mask). Here each sequence (bounds from
    TRL's ``cu_seq_lens_q``, else from the ``position_ids`` restarts) gets its own causal SDPA call, like a
    flash-attention varlen kernel. Anything else (padded batches with a mask, decoding) is plain sdpa."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    bounds = _sequence_bounds(query, key, attention_mask, bool(causal), kwargs)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)  # fmt: skip
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # split, not slices: the backward of a split is one concatenation, while each slice's backward would build a
    # gradient of the whole row (quadratic in the number of sequences)
    lengths = [b - a for a, b in pairwise(bounds)]
    parts = [
        torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True)
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def _varlen_mask(*args: Any, **kwargs: Any) -> Any:
    """The mask for ``VARLEN_ATTENTION``: sdpa's for padded batches; none for padding-free rows (the attention
    splits them by sequence), so no ``T x T`` mask is built."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def use_varlen_attention(model: Any) -> bool:
    """Switch an sdpa model to ``VARLEN_ATTENTION`` (for padding-free / packed batches). False when the model
    keeps its attention: not sdpa (flash attention already handles packed rows; eager is left alone), sliding
    windows (the per-sequence calls would ignore them), or no attention interface."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    config = model.config.get_text_config()
    if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(config, "sliding_window", None):
        return False
    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    try:
        model.set_attn_implementation(VARLEN_ATTENTION)
    except (ValueError, AttributeError) as exc:
        log.warning("cannot switch to the varlen attention (%s); packed rows use sdpa with a block mask", exc)
        return False
    return getattr(model.config.get_text_config(), "_attn_implementation", None) == VARLEN_ATTENTION


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


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _training_args(
    train: TrainSection, out: Path, *, seed: int, has_eval: bool, report_to: Sequence[str], epochs: float
) -> dict[str, Any]:
    eval_every = train.eval_every_steps
    strategy = ("steps" if eval_every else "epoch") if has_eval else "no"
    save_strategy = "steps" if (train.save_steps or eval_every) else "epoch"
    kw: dict[str, Any] = {
        "output_dir": str(out),
        "seed": seed,
        "data_seed": seed,
        "num_train_epochs": epochs,
        "max_steps": train.max_steps,
        "learning_rate": train.learning_rate,
        "lr_scheduler_type": train.lr_scheduler,
        "warmup_steps": train.warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers 5
        "weight_decay": train.weight_decay,
        "per_device_train_batch_size": train.batch_size,
        "per_device_eval_batch_size": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "bf16": train.bf16,
        "fp16": train.fp16,
        "gradient_checkpointing": train.gradient_checkpointing,
        "logging_steps": train.logging_steps,
        "eval_strategy": strategy,
        "save_strategy": save_strategy,
        "save_total_limit": 3,
        "report_to": list(report_to),
        "disable_tqdm": not is_terminal(sys.stderr),  # see library_bars_unless_terminal
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": _has_cuda(),  # pinning needs an accelerator
        "max_length": train.max_length,
    }
    if train.group_by_length:
        kw["train_sampling_strategy"] = "group_by_length"
    if eval_every:
        kw["eval_steps"] = eval_every
    if save_strategy == "steps":
        kw["save_steps"] = train.save_steps or eval_every
    if train.early_stopping_patience and has_eval:
        kw.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
        if save_strategy == "steps" and strategy == "steps":
            kw["save_steps"] = kw["eval_steps"]
        if strategy == "epoch":
            kw["save_strategy"] = "epoch"
    return kw


def completion_loss(model: Any, inputs: Mapping[str, Any], num_items_in_batch: Any = None) -> tuple[Any, Any]:
    """The causal-LM loss with the LM head run only where a label follows (the completion).

    The model computes ``logits_to_keep`` positions — those whose next token is a label in some row of the batch —
    instead of every position: prompt tokens are most of a chat example (62% in bench/train.py), and the head is a
    large share of a small model's compute. Same value as the model's own loss (``labels=``): the summed
    cross-entropy of the kept positions divided by ``num_items_in_batch``, or by their count when it is None
    (tests/retrain/test_train_lean_loss.py). Returns ``(loss, outputs)``; the outputs hold only the kept logits."""
    import torch

    labels = inputs["labels"]
    targets = labels[:, 1:]
    keep = (targets != -100).any(dim=0).nonzero().flatten()
    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=keep)
    logits = outputs.logits.float()
    kept = targets[:, keep].to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), kept.reshape(-1),
                                            ignore_index=-100, reduction="sum")  # fmt: skip
    count = num_items_in_batch if num_items_in_batch is not None else (kept != -100).sum()
    return nll / torch.as_tensor(count, device=nll.device).clamp(min=1), outputs


@dataclass
class _LeanState:
    """The lean trainer's own state (its own attribute, so that no name of TRL's or transformers' is reused)."""

    token_metrics: bool
    trl_loss: bool | None = None  # TRL's own loss (decided at the first step: the model does not change)
    keeps_logits: bool = False  # the model's forward takes ``logits_to_keep`` (most causal LMs of transformers 5)
    tokens: Any = 0  # training tokens seen (padding excluded), a tensor once counted: no host sync per step
    unlogged: bool = False  # a training step ran since the last training log


def _sft_trainer_class() -> Any:
    """TRL's SFTTrainer with a lighter loss unless ``train.token_metrics``, through two public hooks only.

    ``compute_loss`` is the extension point TRL documents (its ``compute_loss_func`` is deprecated since 1.16 and
    runs an extra forward pass per step) and ``log`` is the one transformers documents for extra log values; no
    private member of TRL or transformers is read, written or overridden.

    Why: TRL scores every position for its per-step ``entropy`` and ``mean_token_accuracy`` logs (1.15+: a fused,
    chunked LM head; before: the full logits). Without Triton (CPU) that is several extra passes over the
    ``tokens x vocabulary`` logits, forward and backward: ``python -m bench.train --stock``, padding-free batches,
    2-core CPU, TRL 1.16, median of 3 repeats: 3.30x the plain loop with this loss, 1.99x with TRL's. Here the LM
    head runs only on the positions that predict a label (``completion_loss``): same loss, same masking; only those
    two logs are gone.
    ``num_tokens`` (TRL's log of the training tokens seen, padding excluded) is kept, counted here."""
    import torch
    from transformers import Trainer
    from trl import SFTTrainer

    class LeanSFTTrainer(SFTTrainer):
        def __init__(self, *args: Any, token_metrics: bool = False, **kw: Any):
            self.lean = _LeanState(token_metrics=token_metrics)
            super().__init__(*args, **kw)

        def compute_loss(
            self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            if self.lean.trl_loss is None:
                unwrapped = self.accelerator.unwrap_model(model)
                base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
                # TRL's own loss where it does more than the cross-entropy: metrics asked for, or a MoE router
                # loss (the config asks for router logits: TRL sets that flag from its aux-loss coefficient)
                routed = getattr(base.config.get_text_config(), "output_router_logits", False)
                self.lean.trl_loss = self.lean.token_metrics or bool(routed)
                self.lean.keeps_logits = "logits_to_keep" in inspect.signature(type(base).forward).parameters
            if self.lean.trl_loss or "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False
            if self.lean.keeps_logits and not return_outputs:
                loss, outputs = completion_loss(model, inputs, num_items_in_batch)
                if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                    loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as Trainer.compute_loss
            else:  # logits wanted (evaluation with compute_metrics) or no logits_to_keep: the model's own loss
                loss, outputs = Trainer.compute_loss(self, model, inputs, True, num_items_in_batch)
            if model.training:
                if "attention_mask" in inputs:
                    seen = inputs["attention_mask"].sum()
                else:  # padding-free: one row of real tokens
                    seen = torch.tensor(inputs["input_ids"].size(1), device=inputs["input_ids"].device)
                # tensor-parallel ranks get the same batch: the gathered count has each token tp_size times
                seen = self.accelerator.gather_for_metrics(seen).sum() // self.get_tp_size()
                self.lean.tokens = self.lean.tokens + seen
                self.lean.unlogged = True
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            # like TRL's: in the training logs that follow a training step, cumulative, as a float
            if self.lean.unlogged and self.model is not None and self.model.training:
                logs["num_tokens"] = float(self.lean.tokens)
                self.lean.unlogged = False
            super().log(logs, start_time)

    return LeanSFTTrainer


def _sft_trainer(
    model: Any, tok: Any, train: TrainSection, args_kw: dict[str, Any], train_ds: Any, eval_ds: Any, **kw: Any
) -> Any:
    """The recipe's SFT trainer: TRL's SFTTrainer, configured through its public config and collator only.

    Padding-free batches without packing: TRL's ``padding_free=True`` refuses a custom collator and then leaves
    ``max_length`` unenforced (it raises unless ``max_length=None``). So TRL is configured for padded batches — its
    dataset preparation then truncates each example to ``max_length`` (keep_start) and drops the examples whose
    completion was cut off entirely (TRL >= 1.9) — and its own public collator lays each batch end to end. Same
    examples, same batches as padded training; tested in tests/retrain/test_train_lean_loss.py. Packing is
    padding-free in TRL already (bfd into rows of ``max_length``).

    TRL versions (pyproject: ``>=1.9,!=1.15.*,<2``): tests/retrain/test_train_*.py pass with 1.9.0, 1.9.2, 1.10.0,
    1.11.0, 1.12.0, 1.13.0, 1.14.2 and 1.16.0 (test_retrain_e2e.py too with 1.9.0 and 1.14.2). 1.8 keeps the
    examples truncation left without a completion (the truncation test fails); 1.15.0's fused LM head (TRL's own
    loss: ``token_metrics``, DPO) asks Triton for a GPU driver and fails on a CPU with Triton installed."""
    from trl import SFTConfig
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = None
    if train.padding_free and not train.packing:
        collator = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)
    if train.padding_free or train.packing:
        use_varlen_attention(model)
    sft_cfg = SFTConfig(**args_kw, packing=train.packing, padding_free=train.packing,
                        completion_only_loss=train.completion_only_loss)  # fmt: skip
    return _sft_trainer_class()(
        model=model, args=sft_cfg, data_collator=collator, train_dataset=train_ds, eval_dataset=eval_ds,
        processing_class=tok, token_metrics=train.token_metrics, **kw,
    )  # fmt: skip


def _dataset(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Any:
    import datasets

    return datasets.Dataset.from_dict({c: [str(r[c]) for r in rows] for c in columns})


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

    ``rows``: ``train`` and ``validation`` lists of SFT rows (``prompt``, ``completion``) or preference
    pairs (``prompt``, ``chosen``, ``rejected``) for DPO. ``resume`` continues from the newest checkpoint
    in ``work_dir`` (Trainer's resume_from_checkpoint)."""
    from transformers import EarlyStoppingCallback, set_seed

    started = time.monotonic()
    library_bars_unless_terminal()
    work_dir.mkdir(parents=True, exist_ok=True)
    epochs = train.epochs if epochs is None else epochs
    cols = ["prompt", "completion"] if train.method == "sft" else ["prompt", "chosen", "rejected"]
    train_rows, val_rows = list(rows.get("train", [])), list(rows.get("validation", []))
    if not train_rows:
        raise ValueError("no training rows")
    with torch_threads(train.torch_threads), _env(TENSORBOARD_LOGGING_DIR=str(work_dir / "tensorboard")):
        set_seed(seed)
        model, tok = load_base(model_cfg)
        model = attach_lora(model, lora, warm_start)
        train_ds = _dataset(train_rows, cols)
        eval_ds = _dataset(val_rows, cols) if val_rows else None
        args_kw = _training_args(train, work_dir, seed=seed, has_eval=eval_ds is not None, report_to=report_to,
                                 epochs=epochs)  # fmt: skip
        cbs = list(callbacks)
        if train.early_stopping_patience and eval_ds is not None:
            cbs.append(EarlyStoppingCallback(early_stopping_patience=train.early_stopping_patience))
        optimizers: tuple[Any, Any] = (None, None)
        if train.layer_lr_decay != 1.0:
            optimizers = (layerwise_optimizer(model, train), None)
        trainer: Any
        if train.method == "sft":
            trainer = _sft_trainer(model, tok, train, args_kw, train_ds, eval_ds, callbacks=cbs, optimizers=optimizers)
        else:
            from trl import DPOConfig, DPOTrainer

            dpo_cfg = DPOConfig(**args_kw, beta=train.dpo_beta)
            trainer = DPOTrainer(model=model, args=dpo_cfg, train_dataset=train_ds, eval_dataset=eval_ds,
                                 processing_class=tok, callbacks=cbs, optimizers=optimizers)  # fmt: skip
        ckpt = last_checkpoint(work_dir) if resume else None
        out = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        finalize_adapter(trainer.model, out_dir, model_cfg.base)
    tokens = _count_tokens(trainer, train.method) * max(1, round(out.metrics.get("epoch", epochs) or 1))
    history = list(trainer.state.log_history)
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    hyper = {
        "method": train.method, "learning_rate": train.learning_rate, "epochs": epochs, "max_steps": train.max_steps,
        "batch_size": train.batch_size, "grad_accum": train.grad_accum, "weight_decay": train.weight_decay,
        "lr_scheduler": train.lr_scheduler, "warmup_ratio": train.warmup_ratio, "layer_lr_decay": train.layer_lr_decay,
        "packing": train.packing, "padding_free": train.padding_free, "group_by_length": train.group_by_length,
        "r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
        "target_modules": list(lora.target_modules), "layers_to_transform": lora.layers_to_transform,
        "quantization": model_cfg.quantization, "warm_start": str(warm_start) if warm_start else None, "seed": seed,
    }  # fmt: skip
    return TrainResult(
        adapter_dir=out_dir, log_history=history, hyperparams=hyper, global_step=int(trainer.state.global_step),
        duration_s=time.monotonic() - started, train_tokens=tokens, best_eval_loss=min(evals) if evals else None,
        extra={"train_metrics": dict(out.metrics), "resumed_from": str(ckpt) if ckpt else None},
    )  # fmt: skip


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
    "VARLEN_ATTENTION", "TrainResult", "attach_lora", "finalize_adapter", "last_checkpoint", "layerwise_optimizer",
    "load_base", "train_adapter", "use_varlen_attention", "varlen_sdpa_attention",
]  # fmt: skip
