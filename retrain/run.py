"""The retrain recipe, as steps: ``RetrainRun`` is one run of a recipe for an alias, and its steps
``setup -> export -> prepare -> train -> evaluate -> publish`` are short methods with typed inputs and outputs;
``run_recipe`` below is the whole pipeline on one screen (torchtune's recipe shape).

Everything happens in the run's own directory until the gate passes; only then is the adapter copied under
the adapter root and registered as a candidate. A failed or interrupted run leaves the registry and the
adapter root untouched, and every run, whatever its outcome, is recorded in the runs table. Too little new
data (``NotEnoughData``) is a quiet night, not a failure: the run ends as ``skipped`` and trains nothing."""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from core import paths
from core.errors import LoraloopError
from core.registry import AdapterVersion, Registry, RegistryConfig
from core.runs import RunRecords
from core.store_config import StoreConfig
from retrain.curves import epoch_metrics, plot_curve
from retrain.data import NotEnoughData, PreparedData, prepare
from retrain.evaluate import GateResult, evaluate
from retrain.modelcard import write_model_card
from retrain.recipe import Recipe, base_revision, load_recipe
from retrain.train import TrainResult, library_bars_unless_terminal, train_adapter

log = logging.getLogger(__name__)

Rows = list[dict[str, Any]]
SPLITS = ("train", "validation", "holdout")


class RunFailed(LoraloopError, RuntimeError):
    """The run did not produce a candidate (recorded with outcome 'failed')."""


@dataclass
class RunResult:
    """What ``run_recipe`` did."""

    run_id: str
    outcome: str
    run_dir: Path
    #: why the run ended as it did, in one line (the gate's first reason, or what there was too little of)
    reason: str = ""
    version: str | None = None
    adapter_dir: Path | None = None
    gate: GateResult | None = None
    train: TrainResult | None = None
    row_counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Setup:
    """What the run trains on and against: the base, its revision, and the alias's champion."""

    base: str
    revision: str
    champion: AdapterVersion | None
    #: The champion's adapter, when the recipe warm-starts from it (`lora.init: champion`).
    warm_start: Path | None

    @property
    def parent(self) -> str | None:
        """The version the candidate descends from (warm start), for its lineage."""
        return self.champion.version if self.champion is not None and self.warm_start is not None else None


@dataclass(frozen=True)
class Exported:
    """The alias's feedback since the watermark, as exported rows."""

    watermark: str
    sft: Rows
    pairs: Rows


@dataclass(frozen=True)
class Splits:
    """The prepared data, and which of its datasets the recipe's method trains on."""

    prepared: PreparedData
    kind: Literal["sft", "pairs"]
    counts: dict[str, int]

    def rows(self, kind: Literal["sft", "pairs"], split: str) -> Rows:
        return [dict(r) for r in getattr(self.prepared, kind).get(split, [])]

    def for_training(self) -> dict[str, Rows]:
        return {split: self.rows(self.kind, split) for split in SPLITS}


def run_recipe(
    recipe_path: Path | str | None,
    *,
    alias: str,
    since: str | None = None,
    resume: str | None = None,
    store_root: Path | None = None,
    export_lag_s: float = StoreConfig().export_lag_s,
    registry: RegistryConfig | None = None,
    max_lora_rank: int = 16,
    actor: str = "retrain",
    overrides: dict[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
    echo: bool = True,
) -> RunResult:
    """Run a recipe for ``alias`` end to end (see the module docs). ``resume``: the id of an earlier run of
    the same alias, continued from its last checkpoint with its recipe and exported data. ``store_root`` and
    ``export_lag_s`` are the settings' (the recipe's ``data`` section may override them)."""
    library_bars_unless_terminal()  # loading, tokenizing, training and the gate: lines in a log, not frames
    run = RetrainRun.start(recipe_path, alias=alias, since=since, resume=resume, store_root=store_root,
                           export_lag_s=export_lag_s, registry=registry, max_lora_rank=max_lora_rank, actor=actor,
                           overrides=overrides, callbacks=callbacks, echo=echo)  # fmt: skip
    with run.recorded():
        setup = run.setup()
        exported = run.export()
        splits = run.prepare(setup, exported)
        trained = run.train(setup, splits)
        gate = run.evaluate(setup, splits, trained)
        return run.publish(setup, exported, splits, trained, gate)
    return run.result  # skipped: not enough new data (recorded as such)


class RetrainRun:
    """One run of a recipe for an alias; see ``run_recipe`` for the order of the steps."""

    def __init__(self, recipe: Recipe, *, alias: str, run_id: str, run_dir: Path, since: str | None,
                 resumed: bool, store_root: Path | None, export_lag_s: float, registry: RegistryConfig,
                 max_lora_rank: int, actor: str, callbacks: Sequence[Any], echo: bool) -> None:  # fmt: skip
        self.recipe, self.alias, self.run_id, self.run_dir, self.since = recipe, alias, run_id, run_dir, since
        self.resumed, self.registry_cfg, self.actor = resumed, registry, actor
        self.callbacks, self.echo = callbacks, echo
        self.store_root = recipe.data.store_root or store_root or paths.EVENTS_ROOT
        self.lag_s = recipe.data.lag_s if recipe.data.lag_s is not None else export_lag_s
        self.max_lora_rank = recipe.output.max_lora_rank or max_lora_rank
        self.recipe_hash = recipe.hash()
        self.records = RunRecords(paths.runs_path(registry.path))
        self.started = time.monotonic()
        self.result = RunResult(run_id, "running", run_dir)

    @classmethod
    def start(cls, recipe_path: Path | str | None, *, alias: str, since: str | None, resume: str | None,
              registry: RegistryConfig | None, overrides: dict[str, Any] | None,
              **options: Any) -> RetrainRun:  # fmt: skip
        """A new run of the recipe file, or ``resume``: an earlier run of the alias, with its recipe, directory
        and watermark. The run is recorded as running from here on."""
        if resume is not None:
            prev = RunRecords(paths.runs_path((registry or RegistryConfig()).path)).get(resume)
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
            run_id = f"{alias}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{recipe.hash()[:6]}-{uuid.uuid4().hex[:4]}"
            run_dir = recipe.output.runs_dir / run_id
        output = recipe.output
        registry = registry or RegistryConfig(path=output.registry_path or paths.REGISTRY_PATH,
                                              adapter_root=output.adapter_root or paths.ADAPTER_ROOT)  # fmt: skip
        run = cls(recipe, alias=alias, run_id=run_id, run_dir=run_dir, since=since, resumed=resume is not None,
                  registry=registry, **options)  # fmt: skip
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.json").write_text(json.dumps(recipe.model_dump(mode="json"), indent=2) + "\n")
        run.records.start(run_id, alias, recipe_hash=run.recipe_hash, recipe=recipe.model_dump(mode="json"),
                          recipe_name=recipe.name, recipe_path=str(recipe_path) if recipe_path else None,
                          method=recipe.train.method, since=since, run_dir=str(run_dir))  # fmt: skip
        return run

    @contextmanager
    def recorded(self) -> Iterator[None]:
        """Record a run that stops with an error as failed (interrupted on Ctrl-C) before the error goes on;
        too little data ends the run as skipped, without an error."""
        try:
            yield
        except NotEnoughData as exc:
            self.result.outcome, self.result.reason = "skipped", exc.one_line()
            self.records.finish(self.run_id, "skipped", duration_s=self._elapsed(), error=exc.one_line())
            log.info("run %s skipped: %s", self.run_id, exc.one_line())
        except KeyboardInterrupt:
            self.records.finish(self.run_id, "interrupted", duration_s=self._elapsed(), error="interrupted")
            raise
        except BaseException as exc:
            self.records.finish(self.run_id, "failed", duration_s=self._elapsed(), error=f"{type(exc).__name__}: {exc}")
            raise

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    # --- the steps ----------------------------------------------------------------------------------------

    def setup(self) -> Setup:
        base = self.recipe.model.base
        if not (Path(base) / "config.json").is_file():
            raise RunFailed(f"base model {base!r} not found")
        champion = Registry(self.registry_cfg).champion(self.alias)
        warm = Path(champion.path) if champion is not None and self.recipe.lora.init == "champion" else None
        return Setup(base, self.recipe.model.revision or base_revision(base), champion, warm)

    def export(self) -> Exported:
        """The alias's feedback since the watermark, into the run's directory (kept there for a resume)."""
        from feedback.export import export_training_data, parse_watermark, read_rows

        data_dir, data = self.run_dir / "data", self.recipe.data
        if self.resumed and (data_dir / "manifest.json").is_file():
            watermark = json.loads((data_dir / "manifest.json").read_text())["watermark"]
        else:
            exp = export_training_data(self.store_root, data_dir, since=parse_watermark(self.since), lag_s=self.lag_s,
                                       good_score=data.good_score, bad_score=data.bad_score, alias=self.alias,
                                       formats=("jsonl",), as_datasets=False)  # fmt: skip
            watermark = exp.watermark.isoformat()
        return Exported(watermark, read_rows(data_dir / "sft.jsonl"), read_rows(data_dir / "pairs.jsonl"))

    def prepare(self, setup: Setup, exported: Exported) -> Splits:
        """Clean, scrub, dedupe, split, balance and format (retrain.data), with the base's tokenizer."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(setup.base)
        prepared = prepare(self.recipe.data.prepare, exported.sft, exported.pairs, tokenizer, seed=self.recipe.seed)
        counts = {"exported_sft": len(exported.sft), "exported_pairs": len(exported.pairs)}
        for kind, split in ((k, s) for k in ("sft", "pairs") for s in SPLITS):
            counts[f"{kind}_{split}"] = len(getattr(prepared, kind).get(split, []))
        splits = Splits(prepared, "sft" if self.recipe.train.method == "sft" else "pairs", counts)
        self.result.row_counts = counts
        self.records.update(self.run_id, data_watermark=exported.watermark, row_counts=counts)
        if not counts[f"{splits.kind}_train"]:
            raise NotEnoughData(f"no {splits.kind} training rows since {self.since or 'the start'}", prepared)
        return splits

    def train(self, setup: Setup, splits: Splits) -> TrainResult:
        """One adapter, or the best of an Optuna search; its curves go to the run's directory and record."""
        recipe, rows = self.recipe, splits.for_training()
        if recipe.search.enabled:
            from retrain.search import run_search

            trained, summary = run_search(recipe, rows, self.run_dir, warm_start=setup.warm_start,
                                          callbacks=self.callbacks)  # fmt: skip
            self.records.update(self.run_id, search=summary)
        else:
            trained = train_adapter(recipe.model, recipe.lora, recipe.train, rows, self.run_dir / "adapter",
                                    self.run_dir / "checkpoints", seed=recipe.seed, warm_start=setup.warm_start,
                                    resume=self.resumed, callbacks=self.callbacks)  # fmt: skip
        self.result.train = trained
        plot_curve(trained.log_history, self.run_dir / "training_curve.png", title=self.run_id)
        self.records.update(self.run_id, hyperparams=trained.hyperparams, epochs=epoch_metrics(trained.log_history))
        return trained

    def evaluate(self, setup: Setup, splits: Splits, trained: TrainResult) -> GateResult:
        """The gate: base, champion and candidate on the holdout split (docs/retrain.md)."""
        gate = evaluate(self.recipe.eval, base=setup.base, holdout=splits.rows("sft", "holdout"),
                        pairs=splits.rows("pairs", "holdout"), candidate=trained.adapter_dir,
                        champion=Path(setup.champion.path) if setup.champion else None, run_id=self.run_id,
                        work_dir=self.run_dir)  # fmt: skip
        self.result.gate = gate
        if "search_cv_loss" in trained.hyperparams:  # retrain.search with k-fold cross-validation
            gate.notes.append(f"search: the best trial's validation loss {trained.hyperparams['search_cv_loss']}, "
                              "mean ± sd over the folds")  # fmt: skip
        table = gate.table()
        if self.echo:
            print(table, flush=True)
        (self.run_dir / "gate.txt").write_text(table + "\n")
        self.records.update(self.run_id, gate=gate.to_dict(), passed=gate.passed,
                            eval={n: s.overall for n, s in gate.scores.items()})  # fmt: skip
        return gate

    def publish(self, setup: Setup, exported: Exported, splits: Splits, trained: TrainResult,
                gate: GateResult) -> RunResult:  # fmt: skip
        """The model card always; the adapter copied under the adapter root and registered only when the gate
        passed."""
        registry = Registry(self.registry_cfg)
        version = registry.next_version(self.alias)[0] if gate.passed else None
        write_model_card(
            trained.adapter_dir, alias=self.alias, version=version, run_id=self.run_id,
            recipe=self.recipe.model_dump(mode="json"), recipe_hash=self.recipe_hash, base_model=setup.base,
            base_revision=setup.revision, data_watermark=exported.watermark, row_counts=splits.counts,
            data_summary=splits.prepared.summary_table(), hyperparams=trained.hyperparams,
            epochs=epoch_metrics(trained.log_history), gate_table=gate.table(), gate=gate.to_dict(),
            parent=setup.parent,
        )  # fmt: skip
        result, outcome = self.result, "rejected"
        result.reason = gate.reasons[0] if gate.reasons else ""
        result.adapter_dir = trained.adapter_dir
        if gate.passed and version is not None:
            final = publish(trained.adapter_dir, self.registry_cfg.adapter_root, version, base=setup.base,
                            max_rank=self.max_lora_rank)  # fmt: skip
            try:
                registered = registry.register_candidate(
                    self.alias, final.resolve(), base_model=setup.base, version=version, parent=setup.parent,
                    base_revision=setup.revision, data_watermark=exported.watermark, recipe_hash=self.recipe_hash,
                    run_id=self.run_id, metrics=dict(gate.scores["candidate"].overall), actor=self.actor,
                    reason=f"gate passed: {gate.reasons[0] if gate.reasons else ''}",
                )  # fmt: skip
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise
            result.version, result.adapter_dir, outcome = registered.version, final, "registered"
        result.outcome = outcome
        self.records.finish(self.run_id, outcome, duration_s=self._elapsed(), adapter_version=result.version)
        return result


def publish(adapter_dir: Path, root: Path, version: str, *, base: str, max_rank: int) -> Path:
    """Copy the adapter to ``root/version`` atomically (staging dir + rename) after validating it there as
    the gateway will."""
    from serving.adapter_checks import BaseModelInfo, validate_adapter

    root = root.absolute()  # the check reads a relative path as relative to the root (the default root is relative)
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


__all__ = ["Exported", "RetrainRun", "RunFailed", "RunResult", "Setup", "Splits", "publish", "run_recipe"]
