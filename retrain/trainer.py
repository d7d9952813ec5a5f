"""The trainers of ``retrain.train``: TRL's SFTTrainer (with the lighter completion-only loss, ``completion_loss``,
unless ``train.token_metrics``) or DPOTrainer, their Trainer arguments from the recipe's ``train`` section, the
collators (padding-free batches, row weights) and the early stopping that records why it stopped."""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.progress import is_terminal
from retrain.attention import use_varlen_attention
from retrain.recipe import LoraSection, TrainSection
from retrain.row_weights import LOSS_WEIGHTS, weighted_collator

log = logging.getLogger(__name__)


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def training_args(
    train: TrainSection, out: Path, *, seed: int, has_eval: bool, report_to: Sequence[str], epochs: float
) -> dict[str, Any]:
    """The Trainer's arguments (``SFTConfig`` / ``DPOConfig`` keywords) from the recipe's ``train`` section."""
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
        "disable_tqdm": not is_terminal(sys.stderr),  # see retrain.train.library_bars_unless_terminal
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


def completion_loss(
    model: Any, inputs: Mapping[str, Any], num_items_in_batch: Any = None, *, weights: Any = None,
    keeps_logits: bool = True,
) -> tuple[Any, Any]:  # fmt: skip
    """The causal-LM loss with the LM head run only where a label follows (the completion).

    The model computes ``logits_to_keep`` positions — those whose next token is a label in some row of the batch —
    instead of every position: prompt tokens are most of a chat example (62% in bench/train.py), and the head is a
    large share of a small model's compute. Same value as the model's own loss (``labels=``): the summed
    cross-entropy of the kept positions divided by ``num_items_in_batch``, or by their count when it is None
    (tests/retrain/test_train_lean_loss.py). Returns ``(loss, outputs)``; the outputs hold only the kept logits.

    ``weights`` (the shape of ``labels``, ``retrain.row_weights``): each label's cross-entropy is multiplied by its
    row's weight before the sum; the divisor stays the token count (tests/retrain/test_train_row_weights.py).
    ``keeps_logits=False``: for a model whose forward has no ``logits_to_keep`` (all positions, then selected)."""
    import torch

    labels = inputs["labels"]
    targets = labels[:, 1:]
    keep = (targets != -100).any(dim=0).nonzero().flatten()
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    if keeps_logits:
        outputs = model(**forward, logits_to_keep=keep)
        logits = outputs.logits.float()
    else:
        outputs = model(**forward)
        logits = outputs.logits[:, keep].float()
    kept = targets[:, keep].to(logits.device)
    if weights is None:
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), kept.reshape(-1),
                                                ignore_index=-100, reduction="sum")  # fmt: skip
    else:
        per_label = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), kept.reshape(-1),
                                                      ignore_index=-100, reduction="none")  # fmt: skip
        nll = (per_label * weights[:, 1:][:, keep].reshape(-1).to(per_label)).sum()
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
    unweighted_noted: bool = False  # the warning that TRL's own loss leaves the row weights out was logged


def _note_unweighted(weights: Any, lean: _LeanState) -> None:
    """A batch with row weights that goes to TRL's own loss (a MoE router loss, found at the first step): the
    weights are left out, said once in the log rather than silently."""
    if weights is not None and not lean.unweighted_noted:
        lean.unweighted_noted = True
        log.warning("TRL's own loss (MoE router loss or token_metrics) does not apply the rows' `weight`")


def sft_trainer_class() -> Any:
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
            weights = inputs.pop(LOSS_WEIGHTS, None)  # the rows' weights (retrain.row_weights), training only
            if self.lean.trl_loss or "labels" not in inputs:
                _note_unweighted(weights, self.lean)
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False
            if weights is not None or (self.lean.keeps_logits and not return_outputs):
                loss, outputs = completion_loss(model, inputs, num_items_in_batch, weights=weights,
                                                keeps_logits=self.lean.keeps_logits)  # fmt: skip
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


def sft_trainer(
    model: Any, tok: Any, train: TrainSection, args_kw: dict[str, Any], train_ds: Any, eval_ds: Any,
    weighted: bool = False, **kw: Any,
) -> Any:  # fmt: skip
    """The recipe's SFT trainer: TRL's SFTTrainer, configured through its public config and collator only.

    Padding-free batches without packing: TRL's ``padding_free=True`` refuses a custom collator and then leaves
    ``max_length`` unenforced (it raises unless ``max_length=None``). So TRL is configured for padded batches — its
    dataset preparation then truncates each example to ``max_length`` (keep_start) and drops the examples whose
    completion was cut off entirely (TRL >= 1.9) — and its own public collator lays each batch end to end. Same
    examples, same batches as padded training; tested in tests/retrain/test_train_lean_loss.py. Packing is
    padding-free in TRL already (bfd into rows of ``max_length``).

    ``weighted``: the training dataset has a ``weight`` column (``retrain.row_weights``); the collator turns it into
    per-token loss weights, and the Trainer keeps the column (``remove_unused_columns=False``: by default it drops
    every column the model's forward does not take; the collator ignores the text columns it then also gets).

    TRL versions (pyproject: ``>=1.9,!=1.15.*,<2``): tests/retrain/test_train_*.py pass with 1.9.0, 1.9.2, 1.10.0,
    1.11.0, 1.12.0, 1.13.0, 1.14.2 and 1.16.0 (test_retrain_e2e.py too with 1.9.0 and 1.14.2). 1.8 keeps the
    examples truncation left without a completion (the truncation test fails); 1.15.0's fused LM head (TRL's own
    loss: ``token_metrics``, DPO) asks Triton for a GPU driver and fails on a CPU with Triton installed."""
    from trl import SFTConfig
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = None
    if weighted:
        collator = weighted_collator(tok.pad_token_id, padding_free=train.padding_free)
        args_kw = {**args_kw, "remove_unused_columns": False}
    elif train.padding_free and not train.packing:
        collator = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)
    if train.padding_free or train.packing:
        use_varlen_attention(model)
    sft_cfg = SFTConfig(**args_kw, packing=train.packing, padding_free=train.packing,
                        completion_only_loss=train.completion_only_loss)  # fmt: skip
    return sft_trainer_class()(
        model=model, args=sft_cfg, data_collator=collator, train_dataset=train_ds, eval_dataset=eval_ds,
        processing_class=tok, token_metrics=train.token_metrics, **kw,
    )  # fmt: skip


def dpo_trainer(
    model: Any, tok: Any, train: TrainSection, lora: LoraSection, args_kw: dict[str, Any], train_ds: Any,
    eval_ds: Any, **kw: Any,
) -> Any:  # fmt: skip
    """TRL's DPOTrainer. TRL turns every dropout module off by default (``disable_dropout``), which would leave
    ``lora.dropout`` without effect: with a LoRA dropout it stays on (the reference is the base with the adapter
    disabled, so the dropout there changes nothing)."""
    from trl import DPOConfig, DPOTrainer

    dpo_cfg = DPOConfig(**args_kw, beta=train.dpo_beta, disable_dropout=not lora.dropout)
    return DPOTrainer(model=model, args=dpo_cfg, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
                      **kw)  # fmt: skip


def early_stopping_callback(patience: int) -> Any:
    """transformers' EarlyStoppingCallback that also records when and why it stopped the training (``stopped``:
    the step, the patience, the best validation loss and its step — whose weights ``load_best_model_at_end``
    keeps)."""
    from transformers import EarlyStoppingCallback

    class RecordedEarlyStopping(EarlyStoppingCallback):
        stopped: dict[str, Any] | None = None

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any, **kwargs: Any) -> None:
            super().on_evaluate(args, state, control, metrics, **kwargs)
            if self.stopped is None and self.early_stopping_patience_counter >= self.early_stopping_patience:
                best, best_step = state.best_metric, state.best_global_step
                self.stopped = {
                    "step": int(state.global_step), "max_steps": int(state.max_steps), "patience": patience,
                    "eval_loss": metrics.get("eval_loss"), "best_eval_loss": best, "best_step": best_step,
                    "why": f"step {state.global_step} of {state.max_steps}: {patience} evaluation(s) without a lower "
                           f"validation loss than {best:.4g} (step {best_step}, the weights kept)",
                }  # fmt: skip

    return RecordedEarlyStopping(early_stopping_patience=patience)


__all__ = [
    "completion_loss", "dpo_trainer", "early_stopping_callback", "sft_trainer", "sft_trainer_class", "training_args",
]  # fmt: skip
