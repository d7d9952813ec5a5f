"""The pairwise judge of the open scenario: the served base model itself, behind the gateway alias `judge`
(three worked examples teach it the verdict format), asked through the gate's own judge
(retrain/evaluators/judge.py: the versioned prompt, both orders, strict `A` / `B` / `TIE` parsing, Wilson
interval) — in the gate, and on the demo's held-out answers after (the alias's adapter) against the base's."""

from __future__ import annotations

import os
from typing import Any

from retrain.evaluators.base import Prediction
from retrain.evaluators.judge import (
    Tally,
    answer_text,
    ask_both_orders,
    combine,
    judge_messages,
    openai_judge,
    wilson_interval,
)

from .base import Answer, Comparison, DemoEnv, Item

PROMPT_VERSION = "pairwise-v1"
CONFIDENCE = 0.95
JUDGE_ALIAS = "judge"
# (question, answer A, answer B, verdict): the format, with one example of each verdict
_EXAMPLES = [
    ("user: What is the capital of France?", "Paris.", "Bananas are yellow.", "A"),
    ("user: Name a primary color.", "Seven hundred.", "Blue.", "B"),
    ("user: Say hello.", "Hello!", "Hello!", "TIE"),
]


def judge_alias() -> dict[str, Any]:
    """The `judge` alias: the base, greedy, a verdict's length, with the examples as few-shot turns (after the
    judge prompt's own system message)."""
    shots = [{"user": judge_messages(PROMPT_VERSION, q, a, b)[1]["content"], "assistant": verdict}
             for q, a, b, verdict in _EXAMPLES]  # fmt: skip
    return {"defaults": {"temperature": 0.0, "max_tokens": 4}, "few_shot": shots}


def question_text(item: Item) -> str:
    return "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in item.messages)


def win_rate_figures(outcomes: list[float | None], tally: Tally) -> dict[str, Any]:
    """Wins / ties / losses of "after" over the usable outcomes, the win rate (ties count half) and its Wilson
    interval; how many verdicts were unusable."""
    usable = [o for o in outcomes if o is not None]
    wins, ties = sum(o == 1.0 for o in usable), sum(o == 0.5 for o in usable)
    low, high = wilson_interval(wins + ties / 2, len(usable), CONFIDENCE)
    return {
        "judge_n": len(usable), "judge_wins": wins, "judge_ties": ties, "judge_losses": len(usable) - wins - ties,
        "judge_win_rate": (wins + ties / 2) / len(usable) if usable else None, "judge_win_rate_low": low,
        "judge_win_rate_high": high, "judge_asked": tally.asked, "judge_unusable": tally.unusable,
    }  # fmt: skip


def judge_lines(f: dict[str, Any], judge: str) -> list[str]:
    if f["judge_win_rate"] is None:
        return [f"pairwise judge ({judge}): no usable verdict of {f['judge_asked']} asked"]
    return [
        f"pairwise judge ({judge}), after vs base on {f['judge_n']} held-out prompts: win rate "
        f"**{f['judge_win_rate']:.0%}** (95 % Wilson interval {f['judge_win_rate_low']:.0%}–"
        f"{f['judge_win_rate_high']:.0%}; {f['judge_wins']} wins, {f['judge_ties']} ties, {f['judge_losses']} "
        f"losses; {f['judge_unusable']} of {f['judge_asked']} verdicts unusable)"
    ]


def judge_after_vs_before(items: list[Item], before: list[Answer], after: list[Answer], env: DemoEnv) -> Comparison:
    ask = openai_judge(f"{env.gateway_url}/v1", JUDGE_ALIAS, api_key=os.environ.get(env.api_key_env), max_tokens=4,
                       concurrency=8, timeout_s=300)  # fmt: skip
    asked = [(question_text(i), answer_text(Prediction(a.text)), answer_text(Prediction(b.text)))
             for i, a, b in zip(items, after, before, strict=True)]  # fmt: skip
    tally = Tally()
    outcomes = [combine(x, y) for x, y in ask_both_orders(ask, PROMPT_VERSION, asked, tally)]
    figures = win_rate_figures(outcomes, tally)
    return Comparison(figures, judge_lines(figures, "the served base model as the judge"))


__all__ = ["JUDGE_ALIAS", "judge_after_vs_before", "judge_alias", "judge_lines", "win_rate_figures"]
