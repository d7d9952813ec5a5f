"""Padding-free and packed batches keep their examples apart: per-example losses (and gradients) of one
flattened row equal those of the examples run alone; the recipe's lighter loss equals TRL's."""

from __future__ import annotations

import random
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from retrain.attention import VARLEN_ATTENTION
from retrain.recipe import LoraSection, ModelSection, TrainSection
from retrain.train import train_adapter

LENGTHS = [7, 23, 3, 41, 16]


def _model(tiny: Path, varlen: bool) -> Any:
    import torch

    from retrain.attention import use_varlen_attention
    from retrain.train import attach_lora, load_base

    torch.manual_seed(0)
    model, _ = load_base(ModelSection(base=str(tiny)))
    if varlen:
        assert use_varlen_attention(model)
        assert model.config._attn_implementation == VARLEN_ATTENTION
    model = attach_lora(model, LoraSection(r=4, alpha=8))
    for name, p in model.named_parameters():  # non-zero LoRA B, so the adapter matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def _examples() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(5, 2000) for _ in range(n)] for n in LENGTHS]


def _token_nll(logits: Any, ids: Any) -> Any:
    """Per-token NLL of the next token, (n - 1,) for one sequence."""
    import torch

    return torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="none")


def _alone(model: Any, examples: list[list[int]]) -> list[Any]:
    import torch

    return [_token_nll(model(input_ids=torch.tensor([e])).logits[0], torch.tensor(e)) for e in examples]


def _flat(model: Any, examples: list[list[int]], *, cu: bool, **kw: Any) -> list[Any]:
    """One padding-free row, as TRL's collator builds it (position_ids restart per example)."""
    import torch

    ids = torch.tensor([t for e in examples for t in e])[None]
    pos = torch.cat([torch.arange(len(e)) for e in examples])[None]
    kw["position_ids"] = pos
    if cu:
        bounds = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
        kw.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
    logits = model(input_ids=ids, **kw).logits[0]
    out, start = [], 0
    for e in examples:
        out.append(_token_nll(logits[start : start + len(e)], torch.tensor(e)))
        start += len(e)
    return out


@pytest.mark.parametrize("cu", [True, False], ids=["cu_seq_lens", "position_ids"])
def test_padding_free_row_equals_examples_alone(tiny_model_dir: Path, cu: bool) -> None:
    import torch

    examples = _examples()
    with torch.no_grad():
        alone = _alone(_model(tiny_model_dir, varlen=False), examples)
        flat = _flat(_model(tiny_model_dir, varlen=True), examples, cu=cu)
        # transformers' own sdpa masks packed position_ids too (a block-diagonal T x T mask), but only without a
        # cache: with use_cache on (the default outside training) it silently attends across examples
        stock = _flat(_model(tiny_model_dir, varlen=False), examples, cu=cu, use_cache=False)
    for a, f, s in zip(alone, flat, stock, strict=True):
        torch.testing.assert_close(f, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s, a, rtol=1e-5, atol=1e-5)


def test_varlen_attention_grouped_query_heads() -> None:
    """A model with fewer key/value heads than query heads (GQA), built from a config: same check."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from retrain.attention import use_varlen_attention

    cfg = LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    examples = _examples()
    with torch.no_grad():
        alone = _alone(model, examples)
        assert use_varlen_attention(model)
        flat = _flat(model, examples, cu=True)
    for a, f in zip(alone, flat, strict=True):
        torch.testing.assert_close(f, a, rtol=1e-5, atol=1e-5)


def test_cross_contamination_is_detected(tiny_model_dir: Path) -> None:
    """The check above has teeth: one causal sequence over the concatenation (no restarts) changes every
    example's loss but the first."""
    import torch

    examples = _examples()
    model = _model(tiny_model_dir, varlen=True)
    with torch.no_grad():
        alone = _alone(model, examples)
        ids = torch.tensor([t for e in examples for t in e])[None]
        logits = model(input_ids=ids).logits[0]
    start = len(examples[0])
    second = _token_nll(logits[start : start + len(examples[1])], torch.tensor(examples[1]))
    assert not torch.allclose(second, alone[1], atol=1e-3)


def test_padding_free_gradients_equal_padded_batch(tiny_model_dir: Path) -> None:
    """The LoRA gradients of the flattened row equal those of the right-padded batch with its attention mask."""
    import torch

    examples = _examples()
    pad = 2
    width = max(LENGTHS)
    padded = _model(tiny_model_dir, varlen=False).train()
    ids = torch.tensor([e + [pad] * (width - len(e)) for e in examples])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in examples])
    labels = ids.masked_fill(mask == 0, -100)
    padded(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()

    flat = _model(tiny_model_dir, varlen=True).train()
    row = torch.tensor([t for e in examples for t in e])[None]
    pos = torch.cat([torch.arange(len(e)) for e in examples])[None]
    flat_labels = row.masked_fill(pos == 0, -100)  # as TRL: no label across an example boundary
    flat(input_ids=row, position_ids=pos, labels=flat_labels).loss.backward()

    grads = {n: p.grad for n, p in padded.named_parameters() if p.requires_grad}
    for n, p in flat.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


def test_packed_bfd_batch_equals_examples_alone(tiny_model_dir: Path) -> None:
    """TRL's bfd packing + padding-free collator (seq_lengths -> position_ids, cu_seq_lens) through the varlen
    attention: every packed example scores as if alone."""
    import datasets
    import torch
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = _examples()
    ds = datasets.Dataset.from_dict({"input_ids": examples, "labels": examples})
    packed = pack_dataset(ds, 48, "bfd")
    assert len(packed) < len(examples)  # several examples share a row
    batch = DataCollatorForLanguageModeling(pad_token_id=2, padding_free=True)([dict(r) for r in packed])
    labels = batch.pop("labels")
    model = _model(tiny_model_dir, varlen=True)
    with torch.no_grad():
        alone = {tuple(e): nll for e, nll in zip(examples, _alone(model, examples), strict=True)}
        logits = model(**batch).logits[0]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    bounds = [*starts, batch["position_ids"].size(1)]
    if "cu_seq_lens_q" in batch:  # TRL >= 1.16 also hands the bounds to the attention
        assert batch["cu_seq_lens_q"].tolist() == bounds
    assert len(bounds) - 1 == len(examples)
    for a, b in pairwise(bounds):
        seq = batch["input_ids"][0, a:b]
        assert (labels[0, a] == -100).item()  # the first token of each example predicts nothing across the boundary
        torch.testing.assert_close(_token_nll(logits[a:b], seq), alone[tuple(seq.tolist())], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def chat_rows(tiny_model_dir: Path) -> dict[str, list[dict[str, str]]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rng = random.Random(1)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "fox"]
    rows = []
    for _ in range(24):
        user = " ".join(rng.choice(words) for _ in range(rng.choice([2, 9, 30])))
        prompt = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip
        answer = " ".join(rng.choice(words) for _ in range(rng.choice([1, 6, 20])))
        rows.append({"prompt": prompt, "completion": answer + "<|im_end|>"})
    return {"train": rows[:16], "validation": rows[16:]}


def _run(tiny: Path, rows: Any, tmp: Path, name: str, **train: Any) -> Any:
    kw: dict[str, Any] = {"max_steps": 3, "learning_rate": 3e-3, "batch_size": 8, "max_length": 64}
    kw.update(train)
    return train_adapter(ModelSection(base=str(tiny)), LoraSection(r=4, alpha=8), TrainSection(**kw), rows,
                         tmp / name / "adapter", tmp / name / "work", seed=0, report_to=())  # fmt: skip


def test_loss_same_with_or_without_padding_and_token_metrics(tiny_model_dir: Path, chat_rows: Any,
                                                             tmp_path: Path) -> None:  # fmt: skip
    """Padding-free, padded, TRL's own loss (token_metrics) and length-grouped batches: the same first-step loss
    (same examples, prompt masked, truncated to max_length), and the same trained adapter for the first three."""
    import torch
    from safetensors.torch import load_file

    runs = {
        "padding_free": _run(tiny_model_dir, chat_rows, tmp_path, "pf"),
        "padded": _run(tiny_model_dir, chat_rows, tmp_path, "pad", padding_free=False),
        "trl_loss": _run(tiny_model_dir, chat_rows, tmp_path, "trl", padding_free=False, token_metrics=True),
    }
    first = {k: next(h for h in r.log_history if "loss" in h) for k, r in runs.items()}
    evals = {k: r.best_eval_loss for k, r in runs.items()}
    assert first["trl_loss"]["mean_token_accuracy"] >= 0  # TRL's metrics are there when asked for
    assert "mean_token_accuracy" not in first["padding_free"] and first["padding_free"]["num_tokens"] > 0
    # the recipe's own `num_tokens` log counts what TRL's does: real tokens seen so far, step by step
    num_tokens = {k: [h["num_tokens"] for h in r.log_history if "num_tokens" in h] for k, r in runs.items()}
    assert num_tokens["padding_free"] == num_tokens["padded"] == num_tokens["trl_loss"]
    assert len(num_tokens["trl_loss"]) == 3 and num_tokens["trl_loss"] == sorted(set(num_tokens["trl_loss"]))
    tokens = {r.train_tokens for r in runs.values()}
    assert len(tokens) == 1  # same truncation to max_length with and without padding
    ref = load_file(runs["padded"].adapter_dir / "adapter_model.safetensors")
    for name, res in runs.items():
        assert first[name]["loss"] == pytest.approx(first["padded"]["loss"], rel=1e-5), name
        assert evals[name] == pytest.approx(evals["padded"], rel=1e-4), name
        weights = load_file(res.adapter_dir / "adapter_model.safetensors")
        assert weights.keys() == ref.keys()
        for k in weights:
            torch.testing.assert_close(weights[k], ref[k], rtol=1e-3, atol=1e-5)
    grouped = _run(tiny_model_dir, chat_rows, tmp_path, "gbl", padding_free=False, group_by_length=True)
    assert grouped.global_step == 3 and grouped.hyperparams["group_by_length"]


def test_packing_trains_and_is_deterministic(tiny_model_dir: Path, chat_rows: Any, tmp_path: Path) -> None:
    a = _run(tiny_model_dir, chat_rows, tmp_path, "pa", packing=True, max_length=128, batch_size=2)
    b = _run(tiny_model_dir, chat_rows, tmp_path, "pb", packing=True, max_length=128, batch_size=2)
    assert a.global_step == 3 and a.train_tokens > 0 and a.best_eval_loss is not None
    weights = "adapter_model.safetensors"
    assert (a.adapter_dir / weights).read_bytes() == (b.adapter_dir / weights).read_bytes()


def test_group_by_length_sets_the_sampler(tmp_path: Path) -> None:
    from retrain.trainer import training_args

    kw = training_args(TrainSection(group_by_length=True), tmp_path, seed=0, has_eval=False, report_to=(),
                       epochs=1.0)  # fmt: skip
    assert kw["train_sampling_strategy"] == "group_by_length"
    assert "train_sampling_strategy" not in training_args(TrainSection(), tmp_path, seed=0, has_eval=False,
                                                          report_to=(), epochs=1.0)  # fmt: skip
