"""The retrain recipe as one readable script: setup -> train -> evaluate -> save.

``run_recipe`` exports the alias's feedback since a watermark, prepares it, trains a candidate adapter
(or searches hyper-parameters), runs the evaluation gate and — only when the gate passes — copies the
adapter under the adapter root and registers it as a candidate. Everything happens in the run's own
directory until then, so a failed or interrupted run leaves the registry and the adapter root untouched;
every run, whatever its outcome, is recorded in the runs table."""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deploy.registry import Registry, RegistryConfig
from retrain.config import DataConfig
from retrain.data import PreparedData, prepare
from retrain.evaluate import GateResult, evaluate
from retrain.modelcard import write_model_card
from retrain.recipe import DataSection, Recipe, base_revision, load_recipe
from retrain.records import RunRecords, epoch_metrics, plot_curve
from retrain.train import TrainResult, train_adapter

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """The run did not produce a candidate (recorded with outcome 'failed')."""


@dataclass
class RunResult:
    """What ``run_recipe`` did."""

    run_id: str
    outcome: str
    run_dir: Path
    version: str | None = None
    adapter_dir: Path | None = None
    gate: GateResult | None = None
    train: TrainResult | None = None
    row_counts: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- data


def prepare_data(cfg: DataSection, sft_rows: list[dict[str, Any]], pair_rows: list[dict[str, Any]], tokenizer: Any,
                 *, seed: int) -> PreparedData:  # fmt: skip
    """The data pipeline (retrain.data): clean, scrub, dedupe, split, balance, format; ``data.prepare`` holds
    its DataConfig options."""
    return prepare(DataConfig(**cfg.prepare), sft_rows, pair_rows, tokenizer, seed=seed)


def _rows(prepared: Any, kind: str, split: str) -> list[dict[str, Any]]:
    table = getattr(prepared, kind, {}) or {}
    rows = table.get(split, []) if isinstance(table, dict) else []
    if hasattr(rows, "to_list"):
        rows = rows.to_list()
    return [dict(r) for r in rows]


# ----------------------------------------------------------------------------------------- run


def _new_run_id(alias: str, recipe_hash: str) -> str:
    return f"{alias}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{recipe_hash[:6]}-{uuid.uuid4().hex[:4]}"


def publish(adapter_dir: Path, root: Path, version: str, *, base: str, max_rank: int) -> Path:
    """Copy the adapter to ``root/version`` atomically (staging dir + rename) after validating it there as
    the gateway will."""
    from serving.adapter_checks import BaseModelInfo, validate_adapter

    root.mkdir(parents=True, exist_ok=True)
    final = root / version
    if final.exists():
        raise RunFailed(f"{final} already exists")
    staging = root / f".staging-{version}-{uuid.uuid4().hex[:6]}"
    shutil.copytree(adapter_dir, staging)
    try:
        validate_adapter(staging, root=root, base=BaseModelInfo.from_model_dir(Path(base)), max_rank=max_rank)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def run_recipe(
    recipe_path: Path | str | None,
    *,
    alias: str,
    since: str | None = None,
    resume: str | None = None,
    store_root: Path | None = None,
    registry: RegistryConfig | None = None,
    max_lora_rank: int = 16,
    actor: str = "retrain",
    overrides: dict[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
    echo: bool = True,
) -> RunResult:
    """Run a recipe for ``alias`` end to end (see the module docs). ``resume``: the id of an earlier run of
    the same alias, continued from its last checkpoint with its recipe and exported data."""
    from feedback.export import export_training_data, parse_watermark, read_rows

    started = time.monotonic()
    # ---- setup
    if resume is not None:
        probe = RegistryConfig() if registry is None else registry
        records = RunRecords(probe.path.with_name("runs.duckdb"))
        prev = records.get(resume)
        if prev is None:
            raise RunFailed(f"no run {resume!r} to resume")
        if prev["alias"] != alias:
            raise RunFailed(f"run {resume} is for alias {prev['alias']!r}, not {alias!r}")
        recipe = Recipe.model_validate(prev["recipe"])
        run_id, run_dir, since = resume, Path(prev["run_dir"]), prev["since"]
    else:
        if recipe_path is None:
            raise RunFailed("a recipe is needed")
        recipe = load_recipe(recipe_path, **(overrides or {}))
    reg_cfg = registry or RegistryConfig(
        path=recipe.output.registry_path or RegistryConfig().path,
        adapter_root=recipe.output.adapter_root or RegistryConfig().adapter_root,
    )
    records = RunRecords(reg_cfg.path.with_name("runs.duckdb"))
    recipe_hash = recipe.hash()
    if resume is None:
        run_id = _new_run_id(alias, recipe_hash)
        run_dir = recipe.output.runs_dir / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.json").write_text(json.dumps(recipe.model_dump(mode="json"), indent=2) + "\n")
    records.start(run_id, alias, recipe_hash=recipe_hash, recipe=recipe.model_dump(mode="json"),
                  recipe_name=recipe.name, recipe_path=str(recipe_path) if recipe_path else None,
                  method=recipe.train.method, since=since, run_dir=str(run_dir))  # fmt: skip
    result = RunResult(run_id, "running", run_dir)
    try:
        registry_obj = Registry(reg_cfg)
        base = recipe.model.base
        if not (Path(base) / "config.json").is_file():
            raise RunFailed(f"base model {base!r} not found")
        revision = recipe.model.revision or base_revision(base)
        data_dir = run_dir / "data"
        if resume is None or not (data_dir / "manifest.json").is_file():
            root = recipe.data.store_root or store_root or Path("./.loraloop/events")
            exp = export_training_data(root, data_dir, since=parse_watermark(since), lag_s=recipe.data.lag_s,
                                       good_score=recipe.data.good_score, bad_score=recipe.data.bad_score,
                                       formats=("jsonl",), as_datasets=False)  # fmt: skip
            watermark = exp.watermark.isoformat()
        else:
            watermark = json.loads((data_dir / "manifest.json").read_text())["watermark"]
        sft_rows, pair_rows = read_rows(data_dir / "sft.jsonl"), read_rows(data_dir / "pairs.jsonl")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base)
        prepared = prepare_data(recipe.data, sft_rows, pair_rows, tokenizer, seed=recipe.seed)
        kind = "sft" if recipe.train.method == "sft" else "pairs"
        rows = {s: _rows(prepared, kind, s) for s in ("train", "validation", "holdout")}
        counts = {"exported_sft": len(sft_rows), "exported_pairs": len(pair_rows)}
        for k in ("sft", "pairs"):
            counts |= {f"{k}_{s}": len(_rows(prepared, k, s)) for s in ("train", "validation", "holdout")}
        result.row_counts = counts
        records.update(run_id, data_watermark=watermark, row_counts=counts)
        if not rows["train"]:
            raise RunFailed(f"no {kind} training rows since {since or 'the start'}")
        champion = registry_obj.champion(alias)
        warm = Path(champion.path) if champion is not None and recipe.lora.init == "champion" else None

        # ---- train
        if recipe.search.enabled:
            from retrain.search import run_search

            trained, search_summary = run_search(recipe, rows, run_dir, warm_start=warm, callbacks=callbacks)
            records.update(run_id, search=search_summary)
        else:
            trained = train_adapter(
                recipe.model, recipe.lora, recipe.train, rows, run_dir / "adapter", run_dir / "checkpoints",
                seed=recipe.seed, warm_start=warm, resume=resume is not None, callbacks=callbacks,
            )  # fmt: skip
        result.train = trained
        epochs = epoch_metrics(trained.log_history)
        plot_curve(trained.log_history, run_dir / "training_curve.png", title=run_id)
        records.update(run_id, hyperparams=trained.hyperparams, epochs=epochs)

        # ---- evaluate
        holdout = _rows(prepared, "sft", "holdout")
        pairs_holdout = _rows(prepared, "pairs", "holdout")
        gate = evaluate(recipe.eval, base=base, holdout=holdout, pairs=pairs_holdout, candidate=trained.adapter_dir,
                        champion=Path(champion.path) if champion else None, run_id=run_id,
                        work_dir=run_dir)  # fmt: skip
        result.gate = gate
        table = gate.table()
        if echo:
            print(table, flush=True)
        (run_dir / "gate.txt").write_text(table + "\n")
        records.update(run_id, gate=gate.to_dict(), passed=gate.passed,
                       eval={n: s.overall for n, s in gate.scores.items()})  # fmt: skip

        # ---- save
        version = registry_obj.next_version(alias)[0] if gate.passed else None
        write_model_card(
            trained.adapter_dir, alias=alias, version=version, run_id=run_id, recipe=recipe.model_dump(mode="json"),
            recipe_hash=recipe_hash, base_model=base, base_revision=revision, data_watermark=watermark,
            row_counts=counts, data_summary=_summary(prepared), hyperparams=trained.hyperparams, epochs=epochs,
            gate_table=table, gate=gate.to_dict(), parent=champion.version if champion and warm else None,
        )  # fmt: skip
        outcome = "rejected"
        if gate.passed and version is not None:
            max_rank = recipe.output.max_lora_rank or max_lora_rank
            final = publish(trained.adapter_dir, reg_cfg.adapter_root, version, base=base, max_rank=max_rank)
            cand = gate.scores["candidate"].overall
            try:
                v = registry_obj.register_candidate(
                    alias, final.resolve(), base_model=base, version=version,
                    parent=champion.version if champion and warm else None, base_revision=revision,
                    data_watermark=watermark, recipe_hash=recipe_hash, run_id=run_id, metrics=dict(cand),
                    actor=actor, reason=f"gate passed: {gate.reasons[0] if gate.reasons else ''}",
                )  # fmt: skip
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise
            result.version, result.adapter_dir, outcome = v.version, final, "registered"
        else:
            result.adapter_dir = trained.adapter_dir
        result.outcome = outcome
        records.finish(run_id, outcome, duration_s=time.monotonic() - started, adapter_version=result.version)
        return result
    except KeyboardInterrupt:
        records.finish(run_id, "interrupted", duration_s=time.monotonic() - started, error="interrupted")
        raise
    except BaseException as exc:
        records.finish(run_id, "failed", duration_s=time.monotonic() - started, error=f"{type(exc).__name__}: {exc}")
        raise


def _summary(prepared: Any) -> str | None:
    fn = getattr(prepared, "summary_table", None)
    if fn is None:
        return None
    try:
        return str(fn())
    except Exception:  # the card must not fail on a summary
        return None


__all__ = ["RunFailed", "RunResult", "prepare_data", "publish", "run_recipe"]
