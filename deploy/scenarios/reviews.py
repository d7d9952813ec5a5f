"""`--scenario reviews` (the default): product reviews answered with a single house label, `LIKED` or
`DISLIKED`, which the base model never does. Users rate by whether the answer is exactly the label and often
type the label they wanted; the held-out metric is the preferred-answer rate on reviews of products never seen
in the traffic."""

from __future__ import annotations

import random
from typing import Any

from .base import Answer, Comparison, DemoEnv, Item, Rating, mean

_GOOD = ["love", "really like", "am delighted with", "adore", "am impressed by", "enjoy", "recommend"]
_BAD = ["hate", "regret buying", "am disappointed by", "can't stand", "returned", "dislike", "gave up on"]
_TRAIN_THINGS = ["this blender", "the headphones", "my new phone", "the sofa", "this kettle", "the backpack",
                 "these shoes", "the lamp", "this camera", "the vacuum", "the keyboard", "this tent"]  # fmt: skip
_HOLDOUT_THINGS = ["the toaster", "this jacket", "the monitor", "these speakers", "the mattress", "this watch"]
_REASONS = ["", " It works well.", " Worth the money.", " Shipping was fast.", " Not what I expected.", " Meh."]


def review(rng: random.Random, things: list[str]) -> tuple[str, str]:
    """A review and the house label the users want for it."""
    good = rng.random() < 0.5
    text = f"I {rng.choice(_GOOD if good else _BAD)} {rng.choice(things)}.{rng.choice(_REASONS)}"
    return text, "LIKED" if good else "DISLIKED"


def prompt_messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Review: {text}\nWhat is the verdict on this review?"}]


def _item(text: str, label: str) -> Item:
    return Item(prompt_messages(text), want=label, metadata={"task": "review", "label": label})


class ReviewsScenario:
    name = "reviews"
    metric = "preferred_rate"
    metric_title = "preferred-answer rate"
    holdout_noun = "reviews"
    correction_rate = 0.6
    show_gate = False  # the report as it always was

    def __init__(self, preset: str = "smollm2") -> None:
        self.preset = preset

    def aliases(self, alias: str) -> dict[str, dict[str, Any]]:
        return {alias: {"defaults": {"temperature": 0.0, "max_tokens": 6}}}

    def tool_calling(self) -> dict[str, Any] | None:
        return None

    def tune_recipe(self, recipe: dict[str, Any], preset: str, env: DemoEnv) -> None:
        recipe["eval"]["max_tokens"] = 6

    def traffic_item(self, rng: random.Random) -> Item:
        return _item(*review(rng, _TRAIN_THINGS))

    def holdout_items(self, n: int, seed: int) -> list[Item]:
        rng = random.Random(seed + 1)
        return [_item(*review(rng, _HOLDOUT_THINGS)) for _ in range(n)]

    def rate(self, item: Item, answer: Answer) -> Rating:
        return Rating(answer.text.strip() == item.want, correction=item.want)

    def holdout_metrics(self, items: list[Item], answers: list[Answer]) -> dict[str, float]:
        return {"preferred_rate": mean([float(self.rate(i, a).good) for i, a in zip(items, answers, strict=True)])}

    def metric_titles(self) -> dict[str, str]:
        return {"preferred_rate": self.metric_title}

    def compare(self, items: list[Item], before: list[Answer], after: list[Answer], env: DemoEnv) -> Comparison:
        return Comparison()


__all__ = ["ReviewsScenario", "prompt_messages", "review"]
