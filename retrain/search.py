"""Hyper-parameter search with Optuna: TPE sampler (seeded) and a median pruner fed with the validation
losses each trial reports while it trains. The best trial's adapter becomes the candidate."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retrain.recipe import Recipe
from retrain.train import TrainResult, train_adapter

log = logging.getLogger(__name__)


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


def run_search(
    recipe: Recipe,
    rows: dict[str, list[dict[str, Any]]],
    run_dir: Path,
    *,
    warm_start: Path | None = None,
    callbacks: Sequence[Any] = (),
) -> tuple[TrainResult, dict[str, Any]]:
    """Search over learning rate, rank, alpha, dropout and epochs within the recipe's budget; return the best
    trial's training (its adapter copied to ``run_dir/adapter``) and a summary of all trials."""
    import optuna

    if not rows.get("validation"):
        raise ValueError("the search needs validation rows")
    sp = recipe.search
    results: dict[int, TrainResult] = {}

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("learning_rate", sp.learning_rate[0], sp.learning_rate[1], log=True)
        r = trial.suggest_categorical("r", sp.r)
        alpha_over_r = trial.suggest_categorical("alpha_over_r", sp.alpha_over_r)
        dropout = trial.suggest_float("dropout", sp.dropout[0], sp.dropout[1])
        epochs = trial.suggest_categorical("epochs", sp.epochs)
        lora = recipe.lora.model_copy(update={"r": r, "alpha": max(1, round(r * alpha_over_r)), "dropout": dropout})
        train = recipe.train.model_copy(update={"learning_rate": lr, "early_stopping_patience": None})
        tdir = run_dir / "trials" / f"trial-{trial.number}"
        res = train_adapter(recipe.model, lora, train, rows, tdir / "adapter", tdir / "checkpoints", seed=recipe.seed,
                            warm_start=warm_start, callbacks=[_ReportToOptuna(trial), *callbacks],
                            epochs=float(epochs))  # fmt: skip
        shutil.rmtree(tdir / "checkpoints", ignore_errors=True)
        results[trial.number] = res
        if res.best_eval_loss is None:
            raise ValueError("trial produced no validation loss")
        last = [h["eval_loss"] for h in res.log_history if "eval_loss" in h][-1]
        return float(last)

    study = optuna.create_study(
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=recipe.seed),
        pruner=optuna.pruners.MedianPruner(n_warmup_steps=sp.pruner_warmup_steps),
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=sp.n_trials, timeout=sp.timeout_s, catch=())
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise RuntimeError("no search trial completed")
    best = study.best_trial
    chosen = results[best.number]
    final = run_dir / "adapter"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(chosen.adapter_dir, final)
    chosen.adapter_dir = final
    chosen.hyperparams = {**chosen.hyperparams, "search_trial": best.number}
    summary = {
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params,
        "trials": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                    "intermediate": {str(k): v for k, v in t.intermediate_values.items()}} for t in study.trials],
    }  # fmt: skip
    return chosen, summary


__all__ = ["run_search"]
