"""The gate's open-ended evaluators on the real parts: the session's vLLM generates for base, champion and
candidate (tools passed through, tool calls collected) and serves as the judge endpoint too. The tiny model's
judgement is noise; what is checked is the plumbing: both orders asked over HTTP, every verdict parsed or
counted unparseable, and the gate failing closed when the verdicts are garbage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from retrain.evaluate import evaluate
from retrain.evaluators.judge import JudgeReply, openai_judge, parse_verdict
from retrain.recipe import EvalSection
from tests.conftest import LiveGateway
from tests.live_helpers import vllm_url

pytestmark = pytest.mark.integration

TOOLS = [{"type": "function", "function": {
    "name": "lookup_order", "description": "Find an order",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
}}]  # fmt: skip


def _chat(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def test_judge_and_tool_calls_through_the_served_tiny_model(
    live_gateway: LiveGateway, label_adapters: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    url = vllm_url(live_gateway)
    holdout = [
        {"prompt": "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", "messages": _chat("hello"),
         "answer": "hi", "slices": {"lang": "en"}},
        {"prompt": "<|im_start|>user\nbonjour<|im_end|>\n<|im_start|>assistant\n", "messages": _chat("bonjour"),
         "answer": "salut", "slices": {"lang": "fr"}},
        {"prompt": "", "messages": _chat("Where is order A-17?"), "answer": "", "tools": TOOLS,
         "tool_choice": {"type": "function", "function": {"name": "lookup_order"}},
         "answer_tool_calls": [{"id": "c0", "name": "lookup_order", "arguments": '{"order_id": "A-17"}'}],
         "slices": {"lang": "en"}},
    ]  # fmt: skip
    pairs = [{"prompt": "<|im_start|>user\nthanks<|im_end|>\n<|im_start|>assistant\n", "messages": _chat("thanks"),
              "chosen": "you are welcome<|im_end|>", "rejected": "no<|im_end|>", "chosen_answer": "you are welcome",
              "rejected_answer": "no", "slices": {"lang": "en"}}]  # fmt: skip
    cfg = EvalSection(
        vllm_url=url, max_tokens=24, concurrency=8, evaluators=["exact_match", "judge", "tool_calls"],
        primary_metric="judge_win_rate", judge={"url": f"{url}/v1", "model": "base", "max_tokens": 4, "timeout_s": 60},
    )  # fmt: skip
    real = openai_judge(f"{url}/v1", "base", api_key=None, max_tokens=4, concurrency=8, timeout_s=60)
    asked: list[list[dict[str, str]]] = []
    replies: list[JudgeReply] = []

    def recording(batch: Sequence[list[dict[str, str]]]) -> list[JudgeReply]:
        asked.extend(batch)
        replies.extend(real(batch))
        return replies[-len(batch) :]

    result = evaluate(cfg, base=str(tiny_model_dir), holdout=holdout, pairs=pairs, candidate=label_adapters / "alpha",
                      champion=label_adapters / "bravo", run_id="evlive", work_dir=tmp_path,
                      ask_judge=recording)  # fmt: skip

    # the tool row went to chat with its tools: every model's answer carried a lookup_order call
    for name in ("base", "champion", "candidate"):
        assert result.scores[name].overall["tool_name_accuracy"] == 1.0, result.table()
    assert result.evaluators["tool_calls"] == {"rows": 1}

    judge = result.evaluators["judge"]
    # both orders for each of the 4 prompts, then both orders for the one preference pair (human agreement)
    assert judge["asked"] == 8 and len(asked) == 10
    for first, second in zip(asked[0::2], asked[1::2], strict=True):
        a = first[-1]["content"].split("[Answer A]\n", 1)[1].split("\n\n[Answer B]\n", 1)
        b = second[-1]["content"].split("[Answer A]\n", 1)[1].split("\n\n[Answer B]\n", 1)
        assert a[0] == b[1].split("\n\nWhich answer", 1)[0] and b[0] == a[1].split("\n\nWhich answer", 1)[0]
    assert all(r.error is None for r in replies)  # the endpoint answered every time
    parsed = sum(parse_verdict(r.text) is not None for r in replies[:8])
    assert judge["errors"] == 0 and judge["unparseable"] == 8 - parsed
    assert judge["human_agreement"]["pairs"] == 1
    # the tiny model's replies are not verdicts: the gate cannot judge, and says so first
    assert parsed == 0, [r.text for r in replies]
    assert not result.passed and result.reasons[0].startswith("judge: 8 of 8 verdicts unusable")
    assert "replies not exactly A, B or TIE" in result.reasons[0] and "FAILED" in result.table()
