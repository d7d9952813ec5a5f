"""`--scenario open`: open-ended questions ("How do I keep basil alive?", "Can you explain inflation simply?")
whose users prefer a house style the base model does not write — a one-line summary that starts `In short:`,
and at most 40 words in all (deploy/scenarios/open_rubric.py). They rate by that rubric and often rewrite the
answer into the style (its own first sentence as the summary) as a correction.

The gate's primary metric is the rubric (`rubric:style_score`); it also runs the pairwise judge, with the
served base model itself as the judge (the gateway's alias `judge`: the base with three worked examples of
the verdict format, since SmolLM2-135M does not answer a bare `A`, `B` or `TIE` on its own). Its verdicts are
weak and position-biased, so the judge is reported, not gated on. The report shows the rubric on held-out questions
(subjects never asked in the traffic) before and after, and the judge's win rate of the promoted adapter over
the base on them with its Wilson interval.
"""

from __future__ import annotations

import random
from typing import Any

from .base import Answer, Comparison, DemoEnv, Item, Rating, mean
from .judging import JUDGE_ALIAS, judge_alias
from .open_rubric import MAX_WORDS, has_summary_line, is_short, restyle, style_score

RUBRIC = "deploy.scenarios.open_rubric:style_score"
MAX_TOKENS = 64  # SmolLM2's answers to these questions run longer: cut at ~45 words, over MAX_WORDS

_HOW = ["How do I {t}?", "Any tips to {t}?", "What's the best way to {t}?"]
_EXPLAIN = ["Can you explain {c} simply?", "What is {c}?", "Why does {c} matter?"]
_TRAIN_TASKS = [
    "keep basil alive on a windowsill", "fall asleep faster", "learn a new language", "save money on groceries",
    "start running", "clean a cast iron pan", "write a good cover letter", "focus while working from home",
    "make better coffee at home", "prepare for a job interview", "keep my laptop battery healthy",
    "organize my closet", "reduce my screen time", "cook rice properly", "train a puppy to sit",
    "remember people's names", "make friends in a new city", "write a short story", "paint a room",
    "choose a good watermelon", "study for an exam", "pack for a long trip",
]  # fmt: skip
_TRAIN_CONCEPTS = [
    "inflation", "photosynthesis", "compound interest", "the greenhouse effect", "machine learning",
    "a credit score", "vaccination", "recycling", "gravity", "the water cycle", "democracy", "electricity",
]  # fmt: skip
_HOLDOUT_TASKS = ["stop procrastinating", "grow tomatoes on a balcony", "negotiate a raise", "bake bread",
                  "fix a flat bicycle tire", "meditate"]  # fmt: skip
_HOLDOUT_CONCEPTS = ["black holes", "a mortgage", "supply and demand", "jet lag"]


def question(rng: random.Random, tasks: list[str], concepts: list[str]) -> Item:
    if rng.random() < 0.6:
        kind, text = "how-to", rng.choice(_HOW).format(t=rng.choice(tasks))
    else:
        kind, text = "explain", rng.choice(_EXPLAIN).format(c=rng.choice(concepts))
    return Item([{"role": "user", "content": text}], metadata={"task": "open", "kind": kind})


class OpenScenario:
    name = "open"
    metric = "style_score"
    metric_title = "house-style rubric score"
    holdout_noun = "questions"
    correction_rate = 0.8
    show_gate = True

    def __init__(self, preset: str = "smollm2") -> None:
        self.preset = preset

    def aliases(self, alias: str) -> dict[str, dict[str, Any]]:
        return {alias: {"defaults": {"temperature": 0.0, "max_tokens": MAX_TOKENS}}, JUDGE_ALIAS: judge_alias()}

    def tool_calling(self) -> dict[str, Any] | None:
        return None

    def tune_recipe(self, recipe: dict[str, Any], preset: str, env: DemoEnv) -> None:
        recipe["eval"].update({
            "max_tokens": MAX_TOKENS, "primary_metric": "rubric:style_score",
            "evaluators": [{"rubric": RUBRIC}, "judge"],
            # the judge is the served base model (the gateway's `judge` alias): weak, so reported, not gated on;
            # its unusable replies must not fail the gate either, as long as some verdicts are usable
            "judge": {"url": f"{env.gateway_url}/v1", "model": JUDGE_ALIAS, "api_key_env": env.api_key_env,
                      "max_invalid_fraction": 1.0},
        })  # fmt: skip
        recipe["data"]["prepare"].update({"dedupe": {"near": False}, "splits": {"holdout": 0.2}})
        recipe["train"]["max_length"] = 384
        if preset == "smollm2":  # ~50 rewritten answers (held-out rubric: 79 % after 20 steps, 92 % after 40)
            recipe["train"].update({"learning_rate": 1.0e-3, "max_steps": 40})
        else:  # the tiny model learns no convention in any number of steps: the tiny run checks the plumbing
            recipe["train"]["max_steps"] = 20

    def traffic_item(self, rng: random.Random) -> Item:
        return question(rng, _TRAIN_TASKS, _TRAIN_CONCEPTS)

    def holdout_items(self, n: int, seed: int) -> list[Item]:
        rng = random.Random(seed + 1)
        return [question(rng, _HOLDOUT_TASKS, _HOLDOUT_CONCEPTS) for _ in range(n)]

    def rate(self, item: Item, answer: Answer) -> Rating:
        return Rating(style_score({}, answer.text) == 1.0, correction=restyle(answer.text))

    def holdout_metrics(self, items: list[Item], answers: list[Answer]) -> dict[str, float]:
        texts = [a.text for a in answers]
        return {
            "style_score": mean([style_score({}, t) for t in texts]),
            "summary_rate": mean([float(has_summary_line(t)) for t in texts]),
            "short_rate": mean([float(is_short(t)) for t in texts]),
        }

    def metric_titles(self) -> dict[str, str]:
        return {"style_score": self.metric_title, "summary_rate": "opens with an `In short:` line",
                "short_rate": f"at most {MAX_WORDS} words"}  # fmt: skip

    def compare(self, items: list[Item], before: list[Answer], after: list[Answer], env: DemoEnv) -> Comparison:
        from .judging import judge_after_vs_before

        return judge_after_vs_before(items, before, after, env)


__all__ = ["RUBRIC", "OpenScenario", "question"]
