"""Rendering rows with the base tokenizer's chat template, TRL-ready, and tokenising with a prompt mask.

SFT rows get ``prompt`` (the rendered prompt, generation prompt included) and ``completion`` (the
answer plus the end-of-turn suffix the template renders, cut after the last EOS token so that it
ends with EOS — TRL then adds nothing). DPO rows get ``prompt``, ``chosen`` and ``rejected`` the
same way. Completions-endpoint rows (plain ``prompt`` text) stay text: ``completion`` = answer + EOS.

When the tokenizer adds a BOS token by itself (``add_special_tokens=True``, which TRL uses on text
datasets) and the template also renders it, the rendered BOS is removed so that it is not doubled.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from retrain.data.sources import ANSWER_FIELDS

IGNORE_INDEX = -100


def auto_bos_id(tokenizer: Any) -> int | None:
    """The BOS id the tokenizer prepends on its own (with ``add_special_tokens=True``), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_special) > len(without) and with_special[0] == bos and without[:1] != [bos]:
        return int(bos)
    return None


class Formatter:
    """Renders prompts and answers of normalised rows with one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos = str(getattr(tokenizer, "eos_token", None) or "")
        self.bos_id = auto_bos_id(tokenizer)
        self.bos_text = str(tokenizer.bos_token) if self.bos_id is not None else ""
        self.counts: Counter[str] = Counter()
        self._cache: dict[str, str] = {}  # renders are memoised: the length check and the output share them

    def _strip_bos(self, text: str) -> str:
        if self.bos_text and text.startswith(self.bos_text):
            return text[len(self.bos_text) :]
        return text

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )  # fmt: skip
        return self._strip_bos(str(text))

    def _key(self, row: dict[str, Any]) -> str:
        return json.dumps(row["messages"], ensure_ascii=False, sort_keys=True, default=str)

    def prompt(self, row: dict[str, Any]) -> str:
        """The rendered prompt of a row (raises when the chat template fails)."""
        if not row.get("messages"):
            return str(row.get("prompt") or "")
        key = self._key(row)
        if key not in self._cache:
            self._cache[key] = self._render(row["messages"], True)
        return self._cache[key]

    def _with_eos(self, text: str) -> str:
        return text if not self.eos or text.endswith(self.eos) else text + self.eos

    def completion(self, row: dict[str, Any], prompt: str, answer: str) -> str:
        """The answer as the template renders it after ``prompt`` (end-of-turn included), ending with EOS."""
        if not row.get("messages"):
            return self._with_eos(answer)
        key = self._key(row) + "\x00" + answer
        if key not in self._cache:
            self._cache[key] = self._completion(row, prompt, answer)
        return self._cache[key]

    def _completion(self, row: dict[str, Any], prompt: str, answer: str) -> str:
        full = self._render([*row["messages"], {"role": "assistant", "content": answer}], False)
        if not full.startswith(prompt):
            self.counts["template_prefix_mismatch"] += 1
            return self._with_eos(answer)
        tail = full[len(prompt) :]
        cut = tail.rfind(self.eos) if self.eos else -1
        if cut > 0:  # drop what the template renders after the final EOS (e.g. ChatML's newline)
            return tail[: cut + len(self.eos)]
        return self._with_eos(tail)

    def format_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """A TRL-ready output row (prompt/completion or prompt/chosen/rejected plus bookkeeping columns)."""
        kind = row.get("kind", "sft")
        prompt = self.prompt(row)
        out: dict[str, Any] = {"prompt": prompt}
        for f in ANSWER_FIELDS[kind]:
            out[f] = self.completion(row, prompt, str(row[f]))
        if kind == "sft":
            out["answer"] = row["completion"]
        else:
            out["chosen_answer"], out["rejected_answer"] = row["chosen"], row["rejected"]
        out.update(
            messages=row.get("messages"),
            format="chat" if row.get("messages") else "text",
            request_id=row["request_id"],
            row_id=row["row_id"],
            origin=row.get("origin"),
            alias=row.get("alias"),
            slices=dict(row.get("slices") or {}),
            weight=float(row.get("weight", 1.0)),
            augmented=bool(row.get("augmented", False)),
            augmentation=row.get("augmentation"),
            resampled=bool(row.get("resampled", False)),
            split=row.get("split"),
        )
        if row.get("fold") is not None:
            out["fold"] = int(row["fold"])
        return out


def tokenize_with_mask(
    row: dict[str, Any], tokenizer: Any, max_len: int, *, answer_field: str = "completion"
) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 on every prompt token) of a formatted row.

    ``row`` is an output row of :func:`retrain.data.pipeline.prepare` (rendered ``prompt`` and
    ``completion``; pass ``answer_field="chosen"`` or ``"rejected"`` for DPO rows). The prompt and
    the answer are tokenised separately, so the mask is exact even where BPE could merge across the
    boundary; the tokenizer's own BOS is prepended like ``add_special_tokens=True`` would. Sequences
    longer than ``max_len`` are cut on the right.
    """
    bos = auto_bos_id(tokenizer)
    prompt_ids = list(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
    if bos is not None and prompt_ids[:1] != [bos]:
        prompt_ids.insert(0, bos)
    answer_ids = list(tokenizer(row[answer_field], add_special_tokens=False)["input_ids"])
    input_ids = (prompt_ids + answer_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_len]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


__all__ = ["IGNORE_INDEX", "Formatter", "auto_bos_id", "tokenize_with_mask"]
