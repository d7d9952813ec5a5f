"""Per-row loss weights (``balance.mode: weights``) reach the loss: a row of weight w contributes w times its
tokens' loss to the gradient, padded and padding-free alike; weights all 1.0 are today's loss; the recipe's trainer
carries the ``weight`` column from the rows to the batch; where a weight cannot be applied (DPO, packing, TRL's own
loss) the run says so."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import pytest

from retrain.recipe import LoraSection, ModelSection, TrainSection
from retrain.row_weights import LOSS_WEIGHTS, plan_weights, token_weights

LENGTHS = [(9, 4), (14, 9), (6, 2)]  # (tokens, prompt tokens) of three examples


def _lora_model(tiny: Path) -> Any:
    import torch

    from retrain.attention import use_varlen_attention
    from retrain.train import attach_lora, load_base

    torch.manual_seed(0)
    model, _ = load_base(ModelSection(base=str(tiny)))
    use_varlen_attention(model)  # as the recipe's padding-free training
    model = attach_lora(model, LoraSection(r=4, alpha=8))
    for name, p in model.named_parameters():  # non-zero LoRA B, so the adapter matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()  # no dropout; gradients still flow


def _examples(weights: list[float] | None = None) -> list[dict[str, Any]]:
    rng = random.Random(0)
    out = []
    for i, (n, prompt) in enumerate(LENGTHS):
        ids = [rng.randrange(5, 2000) for _ in range(n)]
        row: dict[str, Any] = {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}
        if weights is not None:
            row["weight"] = weights[i]
        out.append(row)
    return out


def _batch(examples: list[dict[str, Any]], padding_free: bool) -> dict[str, Any]:
    from retrain.row_weights import weighted_collator

    return {**weighted_collator(pad_token_id=2, padding_free=padding_free)(examples), "use_cache": False}


def _grads(model: Any, loss: Any) -> dict[str, Any]:
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return grads


def _loss(model: Any, batch: dict[str, Any]) -> Any:
    from retrain.trainer import completion_loss

    batch = dict(batch)
    weights = batch.pop(LOSS_WEIGHTS, None)
    return completion_loss(model, batch, weights=weights)[0]


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding-free", "padded"])
def test_weighted_gradient_is_the_rows_gradients_in_proportion(tiny_model_dir: Path, padding_free: bool) -> None:
    """Weights [2, 1, 0.5]: the batch's loss is (2 S0 + S1 + 0.5 S2) / N, S_i the summed loss of row i's N_i
    completion tokens and N = sum N_i (the divisor is the token count, not the weighted count). So its gradient
    is sum_i w_i N_i g_i / N with g_i the gradient of row i alone (its mean token loss)."""
    import torch

    weights = [2.0, 1.0, 0.5]
    model = _lora_model(tiny_model_dir)
    batch = _batch(_examples(weights), padding_free)
    tokens = [n - prompt for n, prompt in LENGTHS]  # completion tokens (the first token of a row is never one)
    loss = _loss(model, batch)
    weighted = _grads(model, loss)
    alone = [_grads(model, _loss(model, _batch([e], padding_free))) for e in _examples()]
    total = sum(tokens)
    with torch.no_grad():
        singles = [_loss(model, _batch([e], padding_free)) for e in _examples()]
    expected_loss = sum(w * n * s for w, n, s in zip(weights, tokens, singles, strict=True)) / total
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=1e-5, atol=1e-6)
    for name, grad in weighted.items():
        expected = sum(w * n * g[name] for w, n, g in zip(weights, tokens, alone, strict=True)) / total
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7)
    # the weights do matter: the unweighted gradient is another one
    plain = _grads(model, _loss(model, _batch(_examples(), padding_free)))
    assert any(not torch.allclose(plain[n], weighted[n], rtol=1e-3) for n in plain)


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding-free", "padded"])
def test_weights_of_one_are_the_unweighted_loss(tiny_model_dir: Path, padding_free: bool) -> None:
    """Rows without a weight: no weights in the batch and the same code path (bit for bit: the unweighted loss
    never multiplies); weights all 1.0 through the weighted path: the same loss and gradients."""
    import torch

    model = _lora_model(tiny_model_dir)
    plain_batch = _batch(_examples(), padding_free)
    assert LOSS_WEIGHTS not in plain_batch
    plain = _loss(model, plain_batch)
    plain_grads = _grads(model, plain)
    ones = _loss(model, _batch(_examples([1.0, 1.0, 1.0]), padding_free))
    ones_grads = _grads(model, ones)
    torch.testing.assert_close(ones, plain, rtol=1e-6, atol=1e-7)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ones_grads[name], grad, rtol=1e-5, atol=1e-8)


def test_token_weights_follow_the_collated_layout() -> None:
    import torch

    examples = [{"input_ids": [1, 2, 3], "weight": 2.0}, {"input_ids": [4, 5], "weight": 0.5}]
    flat = token_weights(examples, (1, 6), padding_free=True)  # padded to a multiple: the tail weighs nothing
    torch.testing.assert_close(flat, torch.tensor([[2.0, 2.0, 2.0, 0.5, 0.5, 0.0]]))
    padded = token_weights(examples, (2, 3), padding_free=False)
    torch.testing.assert_close(padded, torch.tensor([[2.0, 2.0, 2.0], [0.5, 0.5, 0.5]]))


def test_plan_weights_applies_or_says_why_not(caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"weight": 1.5}, {"weight": 0.5}]
    assert plan_weights([{"weight": 1.0}, {}], TrainSection()).note == "none"
    assert plan_weights(rows, TrainSection()).apply
    with caplog.at_level(logging.WARNING, logger="retrain.row_weights"):
        for train, why in [(TrainSection(method="dpo"), "DPO"), (TrainSection(packing=True), "packing"),
                           (TrainSection(token_metrics=True), "token_metrics")]:  # fmt: skip
            plan = plan_weights(rows, train)
            assert not plan.apply and plan.note.startswith(f"ignored: {why}")
    assert len(caplog.records) == 3 and all("`weight`" in r.getMessage() for r in caplog.records)


def test_trainer_carries_weights_to_the_loss(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The recipe's SFT trainer on weighted rows: the batches hold each token's row weight, and its
    ``compute_loss`` on such a batch is the weighted loss (not the plain one)."""
    import torch
    from transformers import AutoTokenizer

    from retrain.train import _dataset
    from retrain.trainer import completion_loss, sft_trainer, training_args

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = []
    for i, (user, answer) in enumerate([("alpha bravo", "charlie"), ("delta", "echo fox alpha"), ("bravo", "x")]):
        prompt = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip
        rows.append({"prompt": prompt, "completion": answer + "<|im_end|>", "weight": [3.0, 1.0, 0.25][i]})
    train = TrainSection(max_length=64, batch_size=3)
    model = _lora_model(tiny_model_dir)
    args_kw = training_args(train, tmp_path, seed=0, has_eval=False, report_to=(), epochs=1.0)
    trainer = sft_trainer(model, tok, train, args_kw, _dataset(rows, ["prompt", "completion"], weights=True),
                          None, weighted=True)  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    weights = batch[LOSS_WEIGHTS]
    assert weights.shape == batch["labels"].shape == (1, sum(len(x) for x in trainer.train_dataset["input_ids"]))
    by_row = torch.unique_consecutive(weights[0]).tolist()
    assert sorted(by_row) == [0.25, 1.0, 3.0]  # one weight per example, in the (shuffled) order of the batch
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        plain, _ = completion_loss(model, {k: v for k, v in batch.items() if k != LOSS_WEIGHTS})
        weighted, _ = completion_loss(model, {k: v for k, v in batch.items() if k != LOSS_WEIGHTS}, weights=weights)
    torch.testing.assert_close(loss.detach(), weighted)
    assert not torch.isclose(loss.detach(), plain)


def test_train_adapter_applies_the_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A real training on rows weighted 3 : 1 by label: another first-step loss and another adapter than the same
    rows unweighted, and the run records that the weights went into the loss."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from retrain.train import train_adapter

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = []
    for i in range(8):
        label = "positive" if i % 4 else "negative"
        prompt = tok.apply_chat_template([{"role": "user", "content": f"item {i}"}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip
        rows.append({"prompt": prompt, "completion": label + "<|im_end|>", "weight": 0.5 if i % 4 else 2.5})
    runs = {}
    for name, train_rows in [("weighted", rows), ("plain", [{**r, "weight": 1.0} for r in rows])]:
        runs[name] = train_adapter(ModelSection(base=str(tiny_model_dir)), LoraSection(r=4, alpha=8),
                                   TrainSection(max_steps=2, learning_rate=3e-3, batch_size=8), {"train": train_rows},
                                   tmp_path / name / "adapter", tmp_path / name / "work", seed=0,
                                   report_to=())  # fmt: skip
    assert runs["weighted"].hyperparams["row_weights"] == "loss" and runs["plain"].hyperparams["row_weights"] == "none"
    first = {k: next(h["loss"] for h in r.log_history if "loss" in h) for k, r in runs.items()}
    assert first["weighted"] != pytest.approx(first["plain"], rel=1e-3)
    a, b = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in runs.values())
    assert any(not (a[k] == b[k]).all() for k in a)
