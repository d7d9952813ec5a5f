"""The recipe's SFT trainer goes through public TRL / transformers hooks only, and they still do what it relies on:
the lean loss equals the model's own loss, padding-free batches are truncated and filtered like padded ones and are
those batches laid end to end, and the overridden hooks keep their signatures. These fail loudly when a TRL release
changes one of them (pyproject allows a range of TRL versions)."""

from __future__ import annotations

import ast
import inspect
import random
import textwrap
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from retrain.recipe import LoraSection, ModelSection, TrainSection

MAX_LENGTH = 40


def _lora_model(tiny: Path) -> Any:
    import torch

    from retrain.train import attach_lora, load_base

    torch.manual_seed(0)
    model, tok = load_base(ModelSection(base=str(tiny)))
    model = attach_lora(model, LoraSection(r=4, alpha=8, dropout=0.0))
    for name, p in model.named_parameters():  # non-zero LoRA B, so the adapter matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model, tok


def _examples() -> list[dict[str, list[int]]]:
    """Token ids with the first part of each example masked (the prompt), one without any label."""
    rng = random.Random(0)
    out = []
    for n, prompt in [(7, 3), (23, 15), (3, 1), (41, 30), (16, 16)]:
        ids = [rng.randrange(5, 2000) for _ in range(n)]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _batch(examples: list[dict[str, list[int]]], padding_free: bool) -> dict[str, Any]:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=2, padding_free=padding_free)(examples)


def _lora_grads(model: Any) -> dict[str, Any]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("num_items", [None, 100], ids=["own-count", "num_items_in_batch"])
@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_completion_loss_equals_model_loss(tiny_model_dir: Path, padding_free: bool, num_items: int | None) -> None:
    """Same loss and same LoRA gradients as the model's own loss (``labels=``) on the same batch, with the LM head
    run only where a label follows."""
    import torch

    from retrain.trainer import completion_loss

    model, _ = _lora_model(tiny_model_dir)
    model.eval()  # no dropout; gradients still flow
    batch = {**_batch(_examples(), padding_free), "use_cache": False}
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    own = model(**batch, **extra).loss
    own.backward()
    own_grads = _lora_grads(model)

    lean, outputs = completion_loss(model, batch, num_items)
    lean.backward()
    lean_grads = _lora_grads(model)

    torch.testing.assert_close(lean, own, rtol=1e-6, atol=1e-6)
    assert own_grads.keys() == lean_grads.keys()
    for name, grad in own_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-5, atol=1e-7)
    predicting = (batch["labels"][:, 1:] != -100).any(dim=0).sum().item()
    assert outputs.logits.shape[1] == predicting < batch["input_ids"].shape[1] - 1  # fewer positions through the head


def _rows(tok: Any) -> list[dict[str, str]]:
    """Chat rows: short ones, ones longer than MAX_LENGTH, and one whose prompt alone fills MAX_LENGTH."""
    rng = random.Random(2)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "fox"]
    rows = []
    for prompt_words, answer_words in [(2, 1), (3, 6), (60, 3), (2, 12), (4, 2), (5, 9), (1, 40), (6, 1)]:
        user = " ".join(rng.choice(words) for _ in range(prompt_words))
        prompt = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip
        rows.append({"prompt": prompt, "completion": " ".join(rng.choice(words) for _ in range(answer_words))
                     + "<|im_end|>"})  # fmt: skip
    return rows


def _trainer(tiny: Path, tmp: Path, rows: list[dict[str, str]], **train_kw: Any) -> Any:
    from retrain.train import _dataset
    from retrain.trainer import sft_trainer, training_args

    model, tok = _lora_model(tiny)
    train = TrainSection(max_length=MAX_LENGTH, batch_size=4, **train_kw)
    args_kw = training_args(train, tmp, seed=0, has_eval=False, report_to=(), epochs=1.0)
    return sft_trainer(model, tok, train, args_kw, _dataset(rows, ["prompt", "completion"]), None)


def _expected(tok: Any, rows: list[dict[str, str]]) -> list[tuple[list[int], list[int]]]:
    """What the recipe trains on, computed here: the prompt masked, truncated to the first MAX_LENGTH tokens, rows
    left without a completion token dropped."""
    out = []
    for row in rows:
        prompt = tok(row["prompt"])["input_ids"]
        ids = tok(row["prompt"] + row["completion"])["input_ids"]
        assert ids[: len(prompt)] == prompt
        labels = [-100] * len(prompt) + ids[len(prompt) :]
        ids, labels = ids[:MAX_LENGTH], labels[:MAX_LENGTH]
        if any(label != -100 for label in labels):
            out.append((ids, labels))
    return out


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding-free", "padded"])
def test_truncation_to_max_length(tiny_model_dir: Path, tmp_path: Path, padding_free: bool) -> None:
    """Examples are cut to their first max_length tokens and those whose completion was cut off entirely are
    dropped, with padding-free batches as with padded ones (TRL does it during its dataset preparation)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = _rows(tok)
    expected = _expected(tok, rows)
    lengths = [len(tok(r["prompt"] + r["completion"])["input_ids"]) for r in rows]
    # the rows do test it: some fit, some are cut within their completion, one loses its whole completion
    assert min(lengths) < MAX_LENGTH and sum(n > MAX_LENGTH for n in lengths) >= 3 and len(expected) == len(rows) - 1
    ds = _trainer(tiny_model_dir, tmp_path, rows, padding_free=padding_free).train_dataset
    assert list(zip(ds["input_ids"], ds["labels"], strict=True)) == expected


def test_padding_free_batches_are_the_padded_batches_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The padding-free trainer's batches: the padded trainer's batches (same examples, same order), each laid end
    to end in one row with position_ids restarting per example and no label across an example boundary."""
    import torch
    from transformers import AutoTokenizer

    rows = _rows(AutoTokenizer.from_pretrained(tiny_model_dir))
    flat = list(_trainer(tiny_model_dir, tmp_path / "pf", rows).get_train_dataloader())
    padded = list(_trainer(tiny_model_dir, tmp_path / "pad", rows, padding_free=False).get_train_dataloader())
    assert len(flat) == len(padded) == 2
    for f, p in zip(flat, padded, strict=True):
        assert "attention_mask" not in f and f["input_ids"].shape[0] == 1
        lengths = p["attention_mask"].sum(dim=1).tolist()
        keep = p["attention_mask"].bool()
        labels = p["labels"].clone()
        labels[:, 0] = -100  # the first token of an example predicts nothing across the boundary
        torch.testing.assert_close(f["input_ids"][0], p["input_ids"][keep])
        torch.testing.assert_close(f["labels"][0], labels[keep])
        torch.testing.assert_close(f["position_ids"][0], torch.cat([torch.arange(n) for n in lengths]))
        if "cu_seq_lens_q" in f:  # TRL >= 1.16 also hands the sequence bounds to the attention
            bounds = f["cu_seq_lens_q"].tolist()
            assert [b - a for a, b in pairwise(bounds)] == lengths


def test_only_public_hooks_overridden() -> None:
    """The trainer overrides exactly ``compute_loss`` (TRL's documented extension point) and ``log``
    (transformers'), with their signatures, and touches no private member of TRL or transformers."""
    import dataclasses

    from transformers import Trainer
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from retrain.trainer import sft_trainer_class

    cls = sft_trainer_class()
    overridden = sorted(n for n, v in vars(cls).items() if callable(v) and n != "__init__")
    assert overridden == ["compute_loss", "log"]
    for name in overridden:
        ours = list(inspect.signature(getattr(cls, name)).parameters)
        assert ours == list(inspect.signature(getattr(SFTTrainer, name)).parameters), name
        assert ours == list(inspect.signature(getattr(Trainer, name)).parameters), name
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    private = sorted({node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                      and node.attr.startswith("_") and not node.attr.startswith("__")})  # fmt: skip
    assert private == []
    init = inspect.signature(SFTTrainer.__init__).parameters
    assert {"data_collator", "compute_loss_func"} <= init.keys()
    assert {"pad_token_id", "padding_free"} <= {f.name for f in dataclasses.fields(DataCollatorForLanguageModeling)}
