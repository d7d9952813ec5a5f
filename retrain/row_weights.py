"""Per-row loss weights (``balance.mode: weights``) from the prepared rows to the SFT loss.

The data preparation gives every training row a ``weight`` (mean 1.0 over the training split; 1.0 everywhere when
balancing is off or re-samples). Here the weight becomes a column of the training dataset, the collator turns it
into a per-token tensor (``LOSS_WEIGHTS``, the shape of ``labels``: each token carries its row's weight, in padded
and padding-free batches alike) and ``retrain.trainer.completion_loss`` multiplies each completion token's loss by it.

Normalisation: the weighted sum is divided by the number of completion tokens, as the unweighted loss is (not by
the weighted count): a row of weight w counts as w copies of its tokens, like ``balance.mode: resample`` in
expectation, gradient accumulation and ``num_items_in_batch`` keep their meaning, and weights all 1.0 give the
unweighted loss. Only the training rows are weighted: validation rows carry no weight column, so the validation
loss (early stopping, the search objective) stays the plain mean.

Where the weights cannot be applied they are ignored with a logged warning, never silently: DPO (TRL's
DPOTrainer has no per-example weight), packing (TRL packs only ``input_ids`` and ``labels``) and
``train.token_metrics`` (TRL's own loss)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from retrain.recipe import TrainSection

log = logging.getLogger(__name__)

LOSS_WEIGHTS = "loss_weights"  # the batch key of the per-token weights


def row_weight(row: dict[str, Any]) -> float:
    """A prepared row's loss weight (1.0 when it has none)."""
    return float(row.get("weight", 1.0))


@dataclass(frozen=True)
class WeightPlan:
    """Whether the training rows' weights go into the loss, and what the run records about it."""

    apply: bool
    #: ``none`` (every weight is 1.0), ``loss`` (applied), or ``ignored: <why>``
    note: str


def plan_weights(rows: Sequence[dict[str, Any]], train: TrainSection) -> WeightPlan:
    """Apply the rows' weights when some differ from 1.0 and the trainer can (see the module docs)."""
    if all(row_weight(r) == 1.0 for r in rows):
        return WeightPlan(False, "none")
    if train.method == "dpo":
        why = "DPO (TRL's DPOTrainer takes no per-example weight)"
    elif train.packing:
        why = "packing (TRL packs only input_ids and labels; use padding_free without packing)"
    elif train.token_metrics:
        why = "token_metrics (TRL's own loss)"
    else:
        return WeightPlan(True, "loss")
    log.warning("the training rows' `weight` (balance.mode: weights) is ignored with %s", why)
    return WeightPlan(False, f"ignored: {why}")


def token_weights(examples: Sequence[dict[str, Any]], shape: Sequence[int], padding_free: bool) -> Any:
    """Each token's row weight, laid out like the collated ``labels`` (``shape``): a row per example when padded,
    the examples end to end in one row when padding-free; padding gets 0 (its labels are -100 anyway)."""
    import torch

    weights = [row_weight(e) for e in examples]
    lengths = [len(e["input_ids"]) for e in examples]
    out = torch.zeros(tuple(shape), dtype=torch.float32)
    if padding_free:
        out[0, : sum(lengths)] = torch.repeat_interleave(torch.tensor(weights), torch.tensor(lengths))
    else:
        out[:] = torch.tensor(weights)[:, None]
    return out


def weighted_collator(pad_token_id: int, padding_free: bool) -> Any:
    """TRL's public ``DataCollatorForLanguageModeling`` that also collates the examples' ``weight`` into
    ``LOSS_WEIGHTS`` (a subclass, so TRL still recognises it as its own collator)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    @dataclass
    class WeightedCollator(DataCollatorForLanguageModeling):
        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            out: dict[str, Any] = super().torch_call(examples)
            if "weight" in examples[0]:
                out[LOSS_WEIGHTS] = token_weights(examples, out["labels"].shape, self.padding_free)
            return out

    return WeightedCollator(pad_token_id=pad_token_id, padding_free=padding_free)


__all__ = ["LOSS_WEIGHTS", "WeightPlan", "plan_weights", "row_weight", "token_weights", "weighted_collator"]
