"""The model card (README.md) written into every candidate adapter directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def _table(rows: dict[str, Any]) -> str:
    lines = ["| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows.items()]
    return "\n".join(lines)


def write_model_card(
    adapter_dir: Path,
    *,
    alias: str,
    version: str | None,
    run_id: str,
    recipe: dict[str, Any],
    recipe_hash: str,
    base_model: str,
    base_revision: str,
    data_watermark: str | None,
    row_counts: dict[str, Any],
    data_summary: str | None,
    hyperparams: dict[str, Any],
    epochs: list[dict[str, Any]],
    gate_table: str | None,
    gate: dict[str, Any] | None,
    parent: str | None,
) -> Path:
    """Write ``README.md`` (front matter + data statistics, recipe, metrics and gate verdict)."""
    front = {"library_name": "peft", "base_model": base_model, "tags": ["lora", "loraloop", alias]}
    verdict = "n/a" if gate is None else ("PASSED" if gate.get("passed") else "FAILED")
    parts = [
        "---\n" + yaml.safe_dump(front, sort_keys=True) + "---",
        f"# {version or 'candidate'} ({alias})",
        f"LoRA adapter trained by `loraloop retrain` (run `{run_id}`). Gate verdict: **{verdict}**.",
        "## Lineage",
        _table(
            {
                "base model": base_model,
                "base revision": base_revision,
                "parent": parent or "(from scratch)",
                "data watermark": data_watermark,
                "recipe hash": recipe_hash,
            }
        ),
        "## Data",
        _table({k: v for k, v in row_counts.items()}),
    ]
    if data_summary:
        parts += ["```", data_summary.strip(), "```"]
    parts += ["## Hyper-parameters", _table(hyperparams)]
    if "search_cv_loss" in hyperparams:  # retrain.search with k-fold cross-validation
        loss = str(hyperparams["search_cv_loss"]).replace(")", "; mean ± sd over the folds)")
        parts.append(
            f"Chosen by a cross-validated hyper-parameter search (trial {hyperparams.get('search_trial')}): "
            f"validation loss {loss}; the adapter was then trained with these parameters on the train split."
        )
    if epochs:
        parts += ["## Training per epoch", "| epoch | train loss | validation loss |", "|---|---|---|"]
        parts += [f"| {e['epoch']} | {e.get('train_loss')} | {e.get('eval_loss')} |" for e in epochs]
    if gate_table:
        parts += ["## Evaluation gate", "```", gate_table, "```"]
    recipe_yaml = yaml.safe_dump(json.loads(json.dumps(recipe, default=str)), sort_keys=False).strip()
    parts += ["## Recipe", "```yaml", recipe_yaml, "```"]
    path = adapter_dir / "README.md"
    path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return path


__all__ = ["write_model_card"]
