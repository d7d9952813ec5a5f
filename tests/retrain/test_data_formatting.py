"""Formatting with the tiny model's real (ChatML) tokenizer: TRL prompt/completion text and the loss mask."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.errors import ConfigError
from retrain.data.formatting import IGNORE_INDEX, Formatter, auto_bos_id, tokenize_with_mask
from retrain.data.sources import normalize_rows

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Capital of France?"}]


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def fmt(tok: Any, row: dict[str, Any], kind: str = "sft") -> dict[str, Any]:
    norm, dropped = normalize_rows([row], kind)
    assert not dropped
    return Formatter(tok).format_row(norm[0])


def test_chat_sft_row_is_trl_prompt_completion(tok: Any) -> None:
    out = fmt(tok, {"row_id": "a", "messages": MESSAGES, "completion": "Paris.", "request_id": "q1"})
    assert out["prompt"] == tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert out["prompt"].endswith("<|im_start|>assistant\n")
    # the answer plus the end-of-turn token as the template renders it, ending with EOS (TRL adds nothing)
    assert out["completion"] == "Paris.<|im_end|>"
    assert out["completion"].endswith(tok.eos_token)
    full = tok.apply_chat_template([*MESSAGES, {"role": "assistant", "content": "Paris."}], tokenize=False)
    assert full.startswith(out["prompt"] + out["completion"])
    assert (out["format"], out["answer"], out["messages"], out["request_id"]) == ("chat", "Paris.", MESSAGES, "q1")
    assert (out["weight"], out["augmented"], out["resampled"]) == (1.0, False, False)


def test_prompt_tokens_masked_exactly(tok: Any) -> None:
    out = fmt(tok, {"row_id": "a", "messages": MESSAGES, "completion": "Paris, of course."})
    enc = tokenize_with_mask(out, tok, max_len=512)
    prompt_ids = tok(out["prompt"], add_special_tokens=False)["input_ids"]
    answer_ids = tok(out["completion"], add_special_tokens=False)["input_ids"]
    assert enc["input_ids"] == prompt_ids + answer_ids
    assert enc["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])
    assert enc["labels"][-1] == tok.eos_token_id
    assert tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX]) == "Paris, of course.<|im_end|>"
    short = tokenize_with_mask(out, tok, max_len=len(prompt_ids) + 2)
    assert short["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids[:2]


def test_completions_rows_stay_text(tok: Any) -> None:
    out = fmt(tok, {"row_id": "t", "prompt": "The capital of France is", "completion": " Paris."})
    assert (out["prompt"], out["completion"], out["format"]) == (
        "The capital of France is",
        " Paris.<|im_end|>",
        "text",
    )
    assert out["messages"] is None
    assert "<|im_start|>" not in out["prompt"]


def test_pairs_in_trl_preference_format(tok: Any) -> None:
    row = {"row_id": "p", "messages": MESSAGES, "chosen": "Paris.", "rejected": "Lyon.", "chosen_request_id": "q9"}
    out = fmt(tok, row, "pairs")
    assert out["prompt"].endswith("<|im_start|>assistant\n")
    assert (out["chosen"], out["rejected"]) == ("Paris.<|im_end|>", "Lyon.<|im_end|>")
    assert (out["chosen_answer"], out["rejected_answer"], out["request_id"]) == ("Paris.", "Lyon.", "q9")
    enc = tokenize_with_mask(out, tok, 512, answer_field="rejected")
    assert tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX]) == "Lyon.<|im_end|>"


def test_bos_not_doubled_when_the_tokenizer_adds_it(tiny_model_dir: Path) -> None:
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    tok.chat_template = "{{ bos_token }}" + tok.chat_template  # a Llama-style template rendering BOS itself
    assert auto_bos_id(tok) == bos
    out = fmt(tok, {"row_id": "a", "messages": MESSAGES, "completion": "Paris."})
    assert not out["prompt"].startswith("<s>")
    # TRL tokenises text with add_special_tokens=True: exactly one BOS, as with tokenize_with_mask
    assert tok(out["prompt"] + out["completion"])["input_ids"].count(bos) == 1
    enc = tokenize_with_mask(out, tok, 512)
    assert enc["input_ids"][0] == bos and enc["input_ids"].count(bos) == 1
    assert enc["input_ids"] == tok(out["prompt"] + out["completion"])["input_ids"]


# A ChatML template that shows the tools in a system turn and writes calls in the pythonic style
# (`[name(key="value")]`, what vLLM's `pythonic` parser reads back).
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t.function.name }} {% endfor %}<|im_end|>\n"
    "{% endif %}{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}[{% for c in m.tool_calls %}"
    "{{ c.function.name }}({% for k, v in c.function.arguments.items() %}{{ k }}={{ v | tojson }}"
    "{% if not loop.last %}, {% endif %}{% endfor %}){% if not loop.last %}, {% endif %}{% endfor %}]"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "lookup_order", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "escalate", "parameters": {"type": "object"}}}]  # fmt: skip
WHERE = [
    {"role": "user", "content": "Where is A-7?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c0", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id": "a7"}'}}]},
    {"role": "tool", "tool_call_id": "c0", "content": "no such order"},
    {"role": "user", "content": "Try again, the id is A-7"},
]  # fmt: skip


def test_tool_rows_render_tools_and_calls_with_the_serving_template(tok: Any) -> None:
    call = [{"id": None, "name": "lookup_order", "arguments": '{"order_id":"A-7"}'}]
    row = {"row_id": "t", "messages": WHERE, "tools": TOOLS, "completion": None, "completion_tool_calls": call}
    norm, dropped = normalize_rows([row], "sft")
    assert not dropped
    out = Formatter(tok, chat_template=TOOLS_TEMPLATE).format_row(norm[0])
    assert out["prompt"].startswith("<|im_start|>system\nTools: lookup_order escalate <|im_end|>\n")
    # the earlier call in the conversation is rendered from its logged JSON text, the tool's answer kept
    assert '[lookup_order(order_id="a7")]<|im_end|>\n<|im_start|>tool\nno such order' in out["prompt"]
    assert out["completion"] == '[lookup_order(order_id="A-7")]<|im_end|>'
    assert out["tools"] == TOOLS and out["answer_tool_calls"] == call


def test_pairs_of_tool_calls_render_both_answers(tok: Any) -> None:
    row = {"row_id": "p", "messages": WHERE[:1], "tools": TOOLS, "chosen": "", "rejected": "",
           "chosen_tool_calls": [{"name": "lookup_order", "arguments": '{"order_id": "A-7"}'}],
           "rejected_tool_calls": [{"name": "escalate", "arguments": "{}"}]}  # fmt: skip
    norm, _ = normalize_rows([row], "pairs")
    out = Formatter(tok, chat_template=TOOLS_TEMPLATE).format_row(norm[0])
    assert (out["chosen"], out["rejected"]) == ('[lookup_order(order_id="A-7")]<|im_end|>', "[escalate()]<|im_end|>")


def test_a_template_without_tool_calls_is_an_error_not_a_silent_loss(tok: Any) -> None:
    from retrain.data.formatting import TemplateDropsToolCalls

    row = {"row_id": "t", "messages": WHERE[:1], "tools": TOOLS, "completion": "",
           "completion_tool_calls": [{"name": "escalate", "arguments": "{}"}]}  # fmt: skip
    norm, _ = normalize_rows([row], "sft")
    with pytest.raises(TemplateDropsToolCalls, match=r"data\.chat_template"):
        Formatter(tok).format_row(norm[0])  # the tiny model's own ChatML template knows no tool calls


def test_the_shipped_serving_template_is_found_by_name_and_renders_calls(tok: Any) -> None:
    from retrain.data.formatting import load_chat_template

    template = load_chat_template("smollm2-tools")
    row = {"row_id": "t", "messages": WHERE[:1], "tools": TOOLS, "completion": "",
           "completion_tool_calls": [{"name": "lookup_order", "arguments": '{"order_id": "A-7"}'}]}  # fmt: skip
    norm, _ = normalize_rows([row], "sft")
    out = Formatter(tok, chat_template=template).format_row(norm[0])
    assert '"name": "lookup_order"' in out["prompt"] and out["prompt"].endswith("<|im_start|>assistant\n")
    assert out["completion"] == '[lookup_order(order_id="A-7")]<|im_end|>'
    with pytest.raises(ConfigError, match="neither a file nor a template shipped"):
        load_chat_template("no-such-template")
