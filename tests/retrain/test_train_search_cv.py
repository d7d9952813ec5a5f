"""k-fold cross-validated search (``data.prepare.splits.folds``): each trial trains once per fold on the other
folds of train + validation and scores the mean validation loss; the summary and the candidate's record show
mean ± sd; the candidate is trained with the best parameters on the train split."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest

from retrain.recipe import Recipe, RecipeError, SearchSection, TrainSection, load_recipe
from retrain.search import check_folds, mean_sd, run_search

WEIGHTS = "adapter_model.safetensors"


class _TrainSizes:
    """Records the number of training examples of every training the search runs."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_train_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None, **kw: Any) -> None:
        self.sizes.append(len(train_dataloader.dataset))


def _rows(tiny: Path) -> dict[str, list[dict[str, Any]]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    rows = []
    for i in range(12):
        label = "positive" if i % 3 else "negative"
        prompt = tok.apply_chat_template([{"role": "user", "content": f"item {i} is {label}"}],
                                         add_generation_prompt=True, tokenize=False)  # fmt: skip
        rows.append({"prompt": prompt, "completion": label + "<|im_end|>", "row_id": str(i), "fold": i % 2})
    return {"train": rows[:9], "validation": rows[9:], "holdout": []}


def _recipe(tiny: Path, folds: int) -> Recipe:
    return Recipe.model_validate({
        "model": {"base": str(tiny)},
        "train": TrainSection(max_steps=1, batch_size=8, max_length=64).model_dump(),
        "search": SearchSection(enabled=True, n_trials=2, learning_rate=(1e-3, 5e-3), r=[2, 4],
                                epochs=[1.0]).model_dump(),
        "data": {"prepare": {"splits": {"folds": folds}}},
    })  # fmt: skip


def test_cross_validated_search(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = _rows(tiny_model_dir)
    seen = _TrainSizes()
    best, summary = run_search(_recipe(tiny_model_dir, 2), rows, tmp_path, callbacks=[seen])
    folded = rows["train"] + rows["validation"]
    fold_train = [sum(r["fold"] != k for r in folded) for k in range(2)]
    # 2 trials x 2 folds, each on the other fold of train + validation; then the candidate on the train split
    assert seen.sizes == [*fold_train, *fold_train, len(rows["train"])]
    assert summary["cv_folds"] == 2 and len(summary["trials"]) == 2
    for trial in summary["trials"]:
        cv = trial["cv"]
        assert len(cv["fold_losses"]) == 2 and trial["value"] == pytest.approx(statistics.fmean(cv["fold_losses"]))
        assert cv["sd"] == pytest.approx(statistics.stdev(cv["fold_losses"]))
        assert trial["intermediate"] == {"0": cv["fold_losses"][0], "1": pytest.approx(cv["mean"])}  # running mean
    assert summary["best_value"] == min(t["value"] for t in summary["trials"])
    shown = summary["best_cv"]["shown"]
    assert " ± " in shown and shown.endswith("(2 folds)")
    assert best.hyperparams["search_cv_loss"] == shown and best.hyperparams["search_trial"] == summary["best_trial"]
    assert best.hyperparams["learning_rate"] == summary["best_params"]["learning_rate"]
    assert best.adapter_dir == tmp_path / "adapter" and (best.adapter_dir / WEIGHTS).is_file()
    assert not list((tmp_path / "trials").rglob(WEIGHTS))  # the folds' adapters are not kept


def test_folds_need_validation_rows_and_the_search(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = _rows(tiny_model_dir)
    with pytest.raises(ValueError, match="fold 2 of 3 has no rows"):
        check_folds(rows, 3)  # the rows only have folds 0 and 1
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{base: {tiny_model_dir}}}\ndata: {{prepare: {{splits: {{folds: 3}}}}}}\n")
    with pytest.raises(RecipeError, match="folds cross-validate the search's trials"):
        load_recipe(recipe)
    assert load_recipe(recipe, **{"search.enabled": True}).data.prepare.splits.folds == 3


def test_mean_sd_text() -> None:
    assert mean_sd({"fold_losses": [1.0, 2.0, 3.0], "mean": 2.0, "sd": 1.0}) == "2.0000 ± 1.0000 (3 folds)"


def test_model_card_shows_the_cross_validated_loss(tmp_path: Path) -> None:
    from retrain.modelcard import write_model_card

    card = write_model_card(
        tmp_path, alias="a", version=None, run_id="r", recipe={}, recipe_hash="h", base_model="b", base_revision="x",
        data_watermark=None, row_counts={}, data_summary=None, epochs=[], gate_table=None, gate=None, parent=None,
        hyperparams={"r": 4, "search_trial": 1, "search_cv_loss": "0.5000 ± 0.1000 (2 folds)"},
    ).read_text()  # fmt: skip
    assert "validation loss 0.5000 ± 0.1000 (2 folds; mean ± sd over the folds)" in card
