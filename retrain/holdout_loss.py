"""Loss / perplexity for the gate: a transformers forward pass of the base (+ adapter) over prompt + completion,
the loss counted on the completion tokens only; per row its summed loss and token count, over rows the
token-weighted mean loss, its perplexity and ``neg_loss``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def completion_losses(
    base: str, adapter: Path | None, items: Sequence[tuple[str, str]], *, threads: int | None = 1
) -> list[tuple[float, int]]:
    """(summed loss, token count) of each completion given its prompt under the base (+ adapter)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retrain.train import torch_threads

    if not items:
        return []
    tok = AutoTokenizer.from_pretrained(base)
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    out = []
    with torch_threads(threads), torch.no_grad():
        for prompt, completion in items:
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            c = tok(completion, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p + c])
            labels = torch.tensor([[-100] * len(p) + c])
            out.append((float(model(input_ids=ids, labels=labels).loss) * len(c), len(c)))
    return out


def loss_figures(losses: Sequence[tuple[float, int]]) -> dict[str, float]:
    """Mean completion-token loss (token-weighted), perplexity and neg_loss of per-row (sum, count) losses."""
    total, count = 0.0, 0
    for row_total, row_count in losses:
        total += row_total
        count += row_count
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "neg_loss": -loss}


def holdout_loss(
    base: str, adapter: Path | None, rows: Sequence[dict[str, Any]], *, threads: int | None = 1
) -> dict[str, float]:
    """Mean completion-token loss and perplexity of the base (+ adapter) on the holdout rows."""
    if not rows:
        return {}
    items = [(str(r["prompt"]), str(r["completion"])) for r in rows]
    return loss_figures(completion_losses(base, adapter, items, threads=threads))


__all__ = ["completion_losses", "holdout_loss", "loss_figures"]
