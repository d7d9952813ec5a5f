"""Hyper-parameter search with Optuna: TPE sampler (seeded) and a median pruner. The lowest objective wins.

Without folds a trial trains once on the train split and its objective is its last validation loss; the pruner
gets the validation losses it reports while it trains; the best trial's adapter becomes the candidate.

With k-fold cross-validation (``data.prepare.splits.folds`` = k >= 2: the rows carry a ``fold``, a stable hash of
their split key) a trial trains k times — fold i: train on the other folds of train + validation, validate on the
original rows of fold i (``retrain.data.splits.fold_rows``) — and its objective is the mean of the k last
validation losses; the per-fold losses, their mean and sample standard deviation go into the search summary. The
pruner gets the running mean after each fold (step = folds done - 1), so it can stop a trial between folds
(``pruner_warmup_steps`` then counts folds). No fold's adapter is the candidate: it is trained afterwards with the
best trial's parameters on the normal train split (validated on the validation split)."""

from __future__ import annotations

import logging
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrain.data.splits import fold_rows
from retrain.recipe import LoraSection, Recipe, TrainSection
from retrain.train import TrainResult, train_adapter

log = logging.getLogger(__name__)
Rows = dict[str, list[dict[str, Any]]]


class _ReportToOptuna:
    """A TrainerCallback that reports each validation loss to the trial and prunes when told."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial

    def __getattr__(self, name: str) -> Any:  # every other TrainerCallback hook: do nothing
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kw: Any
    ) -> None:
        import optuna

        if metrics and "eval_loss" in metrics:
            self.trial.report(float(metrics["eval_loss"]), int(state.global_step))
            if self.trial.should_prune():
                raise optuna.TrialPruned()


@dataclass(frozen=True)
class _TrialSetup:
    """One trial's sections and epochs, from the sampled parameters."""

    lora: LoraSection
    train: TrainSection
    epochs: float


def _suggest(trial: Any, recipe: Recipe) -> _TrialSetup:
    sp = recipe.search
    lr = trial.suggest_float("learning_rate", sp.learning_rate[0], sp.learning_rate[1], log=True)
    r = trial.suggest_categorical("r", sp.r)
    alpha_over_r = trial.suggest_categorical("alpha_over_r", sp.alpha_over_r)
    dropout = trial.suggest_float("dropout", sp.dropout[0], sp.dropout[1])
    epochs = trial.suggest_categorical("epochs", sp.epochs)
    return _setup(recipe, {"learning_rate": lr, "r": r, "alpha_over_r": alpha_over_r, "dropout": dropout,
                           "epochs": epochs})  # fmt: skip


def _setup(recipe: Recipe, params: dict[str, Any]) -> _TrialSetup:
    r = params["r"]
    update = {"r": r, "alpha": max(1, round(r * params["alpha_over_r"])), "dropout": params["dropout"]}
    lora = recipe.lora.model_copy(update=update)
    train = recipe.train.model_copy(update={"learning_rate": params["learning_rate"], "early_stopping_patience": None})
    return _TrialSetup(lora, train, float(params["epochs"]))


def _last_eval_loss(res: TrainResult) -> float:
    losses = [h["eval_loss"] for h in res.log_history if "eval_loss" in h]
    if not losses:
        raise ValueError("trial produced no validation loss")
    return float(losses[-1])


def check_folds(rows: Rows, folds: int) -> None:
    """Every fold has original rows to validate on (else the fold's loss would be missing)."""
    for k in range(folds):
        if not fold_rows(rows, k)[1]:
            raise ValueError(f"cross-validation fold {k} of {folds} has no rows to validate on (fewer folds?)")


def _spread(losses: Sequence[float]) -> dict[str, Any]:
    """Per-fold losses, their mean and sample standard deviation."""
    return {"fold_losses": list(losses), "mean": statistics.fmean(losses),
            "sd": statistics.stdev(losses) if len(losses) > 1 else 0.0}  # fmt: skip


def mean_sd(spread: dict[str, Any]) -> str:
    """``0.8123 ± 0.0345 (3 folds)``: how the gate's report and the model card show a cross-validated loss."""
    return f"{spread['mean']:.4f} ± {spread['sd']:.4f} ({len(spread['fold_losses'])} folds)"


def run_search(
    recipe: Recipe,
    rows: Rows,
    run_dir: Path,
    *,
    warm_start: Path | None = None,
    callbacks: Sequence[Any] = (),
) -> tuple[TrainResult, dict[str, Any]]:
    """Search over learning rate, rank, alpha, dropout and epochs within the recipe's budget; return the
    candidate's training (its adapter in ``run_dir/adapter``) and a summary of all trials (see the module docs)."""
    import optuna

    if not rows.get("validation"):
        raise ValueError("the search needs validation rows")
    sp, folds = recipe.search, recipe.data.prepare.splits.folds
    if folds > 1:
        check_folds(rows, folds)
    results: dict[int, TrainResult] = {}

    def train_on(setup: _TrialSetup, split: Rows, where: Path, extra: Sequence[Any]) -> TrainResult:
        res = train_adapter(recipe.model, setup.lora, setup.train, split, where / "adapter", where / "checkpoints",
                            seed=recipe.seed, warm_start=warm_start, callbacks=[*extra, *callbacks],
                            epochs=setup.epochs)  # fmt: skip
        shutil.rmtree(where / "checkpoints", ignore_errors=True)
        return res

    def objective(trial: optuna.Trial) -> float:
        setup, tdir = _suggest(trial, recipe), run_dir / "trials" / f"trial-{trial.number}"
        if folds < 2:
            results[trial.number] = res = train_on(setup, rows, tdir, [_ReportToOptuna(trial)])
            return _last_eval_loss(res)
        losses: list[float] = []
        for k in range(folds):
            train, validation = fold_rows(rows, k)
            res = train_on(setup, {"train": train, "validation": validation}, tdir / f"fold-{k}", [])
            shutil.rmtree(tdir / f"fold-{k}", ignore_errors=True)  # only its loss counts
            losses.append(_last_eval_loss(res))
            trial.set_user_attr("cv", _spread(losses))
            trial.report(statistics.fmean(losses), k)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return statistics.fmean(losses)

    study = optuna.create_study(
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=recipe.seed),
        pruner=optuna.pruners.MedianPruner(n_warmup_steps=sp.pruner_warmup_steps),
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=sp.n_trials, timeout=sp.timeout_s, catch=())
    if not [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]:
        raise RuntimeError("no search trial completed")
    best = study.best_trial
    final = run_dir / "adapter"
    if final.exists():
        shutil.rmtree(final)
    if folds < 2:
        chosen = results[best.number]
        shutil.copytree(chosen.adapter_dir, final)
        chosen.adapter_dir = final
    else:  # the best parameters, trained on the train split: the candidate the gate evaluates
        chosen = train_on(_setup(recipe, best.params), rows, run_dir / "trials" / "final", [])
        shutil.copytree(chosen.adapter_dir, final)
        shutil.rmtree(run_dir / "trials" / "final", ignore_errors=True)
        chosen.adapter_dir = final
    summary = _summary(study, folds)
    chosen.hyperparams = {**chosen.hyperparams, "search_trial": best.number}
    if folds > 1:
        chosen.hyperparams["search_cv_loss"] = mean_sd(best.user_attrs["cv"])
        log.info("search: best trial %d, validation loss %s", best.number, mean_sd(best.user_attrs["cv"]))
    return chosen, summary


def _summary(study: Any, folds: int) -> dict[str, Any]:
    """What the run record keeps of the search (``search`` in runs.duckdb)."""
    best = study.best_trial
    summary: dict[str, Any] = {
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params,
        "cv_folds": folds if folds > 1 else 0,
        "objective": f"mean validation loss over {folds} folds" if folds > 1 else "validation loss",
        "candidate": "retrained with best_params on the train split" if folds > 1 else "the best trial's adapter",
        "trials": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                    "intermediate": {str(k): v for k, v in t.intermediate_values.items()},
                    **({"cv": t.user_attrs["cv"]} if "cv" in t.user_attrs else {})}
                   for t in study.trials],
    }  # fmt: skip
    if folds > 1:
        summary["best_cv"] = {**best.user_attrs["cv"], "shown": mean_sd(best.user_attrs["cv"])}
    return summary


__all__ = ["check_folds", "mean_sd", "run_search"]
