"""Rendering rows with the base tokenizer's chat template, TRL-ready, and tokenising with a prompt mask.

SFT rows get ``prompt`` (the rendered prompt, generation prompt included) and ``completion`` (the
answer plus the end-of-turn suffix the template renders, cut after the last EOS token so that it
ends with EOS — TRL then adds nothing). DPO rows get ``prompt``, ``chosen`` and ``rejected`` the
same way. Completions-endpoint rows (plain ``prompt`` text) stay text: ``completion`` = answer + EOS.

Rows with ``tools`` render them through the template (``apply_chat_template(..., tools=...)``) and answers
with tool calls render as the assistant message with ``tool_calls`` (OpenAI shape, arguments as an object —
what HF templates and vLLM's chat rendering expect). ``chat_template`` overrides the tokenizer's: training
must render with the template the model is served with (a template that drops the calls is an error, not a
silent loss of the training signal).

When the tokenizer adds a BOS token by itself (``add_special_tokens=True``, which TRL uses on text
datasets) and the template also renders it, the rendered BOS is removed so that it is not doubled.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from typing import Any

from core.errors import ConfigError
from retrain.data.sources import ANSWER_FIELDS

IGNORE_INDEX = -100


class TemplateDropsToolCalls(ConfigError):
    """The chat template renders an answer's tool calls as nothing: training on it would teach no calls."""


def load_chat_template(value: str | None) -> str | None:
    """The Jinja text of ``data.chat_template``: a template shipped in serving/templates by name (the names
    `backends.managed.tool_calling.chat_template` takes), else a file."""
    if value is None:
        return None
    from serving.managed import chat_template_path

    path = chat_template_path(value)
    if not path.is_file():
        raise ConfigError(f"data.chat_template {value!r} is neither a file nor a template shipped in serving/templates")
    return path.read_text(encoding="utf-8")


def openai_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored calls (``{id, name, arguments}`` with JSON text) as the assistant message's ``tool_calls`` the
    chat templates read (arguments as an object when they parse)."""
    out = []
    for i, c in enumerate(calls):
        arguments: Any = c.get("arguments") or "{}"
        if isinstance(arguments, str):
            with contextlib.suppress(ValueError):  # else rendered as the text the model wrote
                arguments = json.loads(arguments)
        call_id = c.get("id") or f"call_{i}"
        out.append({"id": call_id, "type": "function", "function": {"name": c["name"], "arguments": arguments}})
    return out


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

    def __init__(self, tokenizer: Any, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.eos = str(getattr(tokenizer, "eos_token", None) or "")
        self.bos_id = auto_bos_id(tokenizer)
        self.bos_text = str(tokenizer.bos_token) if self.bos_id is not None else ""
        self.counts: Counter[str] = Counter()
        self._cache: dict[str, str] = {}  # renders are memoised: the length check and the output share them

    def _strip_bos(self, text: str) -> str:
        if self.bos_text and text.startswith(self.bos_text):
            return text[len(self.bos_text) :]
        return text

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool, tools: Any = None) -> str:
        extra: dict[str, Any] = {"tools": tools} if tools else {}
        if self.chat_template:
            extra["chat_template"] = self.chat_template
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **extra
        )  # fmt: skip
        return self._strip_bos(str(text))

    def _key(self, row: dict[str, Any]) -> str:
        return json.dumps([row["messages"], row.get("tools")], ensure_ascii=False, sort_keys=True, default=str)

    def prompt(self, row: dict[str, Any]) -> str:
        """The rendered prompt of a row (raises when the chat template fails)."""
        if not row.get("messages"):
            return str(row.get("prompt") or "")
        key = self._key(row)
        if key not in self._cache:
            self._cache[key] = self._render(_template_messages(row["messages"]), True, row.get("tools"))
        return self._cache[key]

    def answer(self, row: dict[str, Any], prompt: str, field: str) -> str:
        """Answer ``field`` of a row (its text and its tool calls) as rendered after ``prompt``."""
        return self.completion(row, prompt, str(row.get(field) or ""), row.get(f"{field}_tool_calls"))

    def _with_eos(self, text: str) -> str:
        return text if not self.eos or text.endswith(self.eos) else text + self.eos

    def completion(
        self, row: dict[str, Any], prompt: str, answer: str, tool_calls: list[dict[str, Any]] | None = None
    ) -> str:
        """The answer (text, tool calls) as the template renders it after ``prompt`` (end-of-turn included),
        ending with EOS."""
        if not row.get("messages"):
            return self._with_eos(answer)
        key = self._key(row) + "\x00" + answer + "\x00" + json.dumps(tool_calls)
        if key not in self._cache:
            self._cache[key] = self._completion(row, prompt, answer, tool_calls)
        return self._cache[key]

    def _completion(
        self, row: dict[str, Any], prompt: str, answer: str, tool_calls: list[dict[str, Any]] | None
    ) -> str:
        said: dict[str, Any] = {"role": "assistant", "content": answer}
        if tool_calls:
            said["tool_calls"] = openai_tool_calls(tool_calls)
        full = self._render([*_template_messages(row["messages"]), said], False, row.get("tools"))
        missing = [c["name"] for c in tool_calls or () if c["name"] not in full[len(prompt) :]]
        if missing:
            raise TemplateDropsToolCalls(
                f"the chat template does not render the tool call(s) {', '.join(missing)}: set data.chat_template "
                "to the template the model is served with (one that renders tools and tool_calls)"
            )
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
            out[f] = self.answer(row, prompt, f)
        if kind == "sft":
            out["answer"], out["answer_tool_calls"] = row["completion"], row.get("completion_tool_calls")
        else:
            out["chosen_answer"], out["rejected_answer"] = row["chosen"], row["rejected"]
            out["chosen_tool_calls"], out["rejected_tool_calls"] = (
                row.get("chosen_tool_calls"),
                row.get("rejected_tool_calls"),
            )
        out.update(
            messages=row.get("messages"),
            tools=row.get("tools"),
            tool_choice=row.get("tool_choice"),
            response_format=row.get("response_format"),
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


def _template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prompt messages for the template: logged assistant tool calls (OpenAI shape, arguments as JSON text)
    with their arguments as objects, like the answers."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls and isinstance(calls, list) and all(isinstance(c, dict) for c in calls):
            flat = [{"id": c.get("id"), **(c.get("function") or {})} for c in calls]
            m = {**m, "tool_calls": openai_tool_calls([c for c in flat if c.get("name")])}
        out.append(m)
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


__all__ = [
    "IGNORE_INDEX",
    "Formatter",
    "TemplateDropsToolCalls",
    "auto_bos_id",
    "load_chat_template",
    "openai_tool_calls",
    "tokenize_with_mask",
]
