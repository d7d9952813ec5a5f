"""A training run's curves: per-epoch figures from the Trainer's log history (for the runs table and the
model card) and the loss plot written into the run's directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def epoch_metrics(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-epoch figures from a Trainer log history: mean train loss and the last validation loss."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for h in log_history:
        ep = h.get("epoch")
        if ep is None:
            continue
        key = max(1, int(-(-float(ep) // 1)))  # epoch 0.5 -> 1, 1.0 -> 1, 1.25 -> 2
        e = by_epoch.setdefault(key, {"epoch": key, "train_losses": []})
        if "loss" in h:
            e["train_losses"].append(float(h["loss"]))
        if "eval_loss" in h:
            e["eval_loss"] = float(h["eval_loss"])
        if "step" in h:
            e["step"] = int(h["step"])
    out = []
    for key in sorted(by_epoch):
        e = by_epoch[key]
        losses = e.pop("train_losses")
        e["train_loss"] = sum(losses) / len(losses) if losses else None
        out.append(e)
    return out


def plot_curve(log_history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Training and validation loss against the step, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    tr = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    ev = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if tr:
        ax.plot(*zip(*tr, strict=True), label="train loss")
    if ev:
        ax.plot(*zip(*ev, strict=True), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["epoch_metrics", "plot_curve"]
