"""What a demo scenario is: the app the simulated users talk to, their hidden preference, and how the demo
measures it on held-out requests (deploy/demo.py drives every scenario the same way)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Item:
    """One request a simulated user sends: the chat messages, the request's extra fields (``tools``,
    ``tool_choice``), what that user wants (a label, a tool call, a style: the scenario reads it) and the
    feedback's metadata (slices of the training rows)."""

    messages: list[dict[str, Any]]
    want: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Answer:
    """The model's answer as the OpenAI API returned it: its text and its tool calls (OpenAI shape)."""

    text: str = ""
    tool_calls: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Answer:
        return cls(str(message.get("content") or ""), tuple(message.get("tool_calls") or ()))


@dataclass(frozen=True)
class Rating:
    """A simulated user's verdict on an answer: ``good`` (the thumbs), and the correction the user would type
    (the feedback value of a `correction`; None when the user has nothing to type)."""

    good: bool
    correction: Any = None


@dataclass
class Comparison:
    """What a scenario adds beside its held-out metrics when comparing the answers before and after (the open
    scenario's judge: its win rate and Wilson interval). ``figures`` go into the result, ``lines`` into the
    report and the console."""

    figures: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DemoEnv:
    """Where the demo's model is reached: the vLLM behind the gateway (the gate generates on it) and the gateway
    itself (OpenAI API at ``gateway_url``/v1, its API key in the environment variable ``api_key_env``)."""

    vllm_url: str
    gateway_url: str
    api_key_env: str = "LORALOOP_DEMO_API_KEY"


class Scenario(Protocol):
    """One demo scenario (reviews, tools, open): everything deploy/demo.py needs to know about the app."""

    name: str  # the --scenario name, also the default alias
    metric: str  # the key of the held-out metric that decides success (in `holdout_metrics`' result)
    metric_title: str  # how the report names it ("preferred-answer rate")
    holdout_noun: str  # what the held-out items are ("reviews")
    correction_rate: float  # the share of wrong answers the users also correct
    show_gate: bool  # the report shows the gate's table (the reviews report stays as it always was)

    def aliases(self, alias: str) -> dict[str, dict[str, Any]]:
        """The gateway's aliases (AliasConfig fields): ``alias``, the one the users call, and any helper."""
        ...

    def tool_calling(self) -> dict[str, Any] | None:
        """`backends.managed.tool_calling` for the managed vLLM; None = off."""
        ...

    def tune_recipe(self, recipe: dict[str, Any], preset: str, env: DemoEnv) -> None:
        """Adjust the SFT recipe (recipes/sft_lora.yaml with the demo's base, paths and sizes) in place."""
        ...

    def traffic_item(self, rng: random.Random) -> Item:
        """One request of the users' daily traffic."""
        ...

    def holdout_items(self, n: int, seed: int) -> list[Item]:
        """The held-out requests (never in the traffic) the demo measures before and after."""
        ...

    def rate(self, item: Item, answer: Answer) -> Rating:
        """How the user who sent ``item`` rates ``answer`` (and corrects it)."""
        ...

    def holdout_metrics(self, items: list[Item], answers: list[Answer]) -> dict[str, float]:
        """The held-out metrics of one model's answers; ``metric`` among them."""
        ...

    def metric_titles(self) -> dict[str, str]:
        """Report names of the metrics `holdout_metrics` returns, primary first."""
        ...

    def compare(self, items: list[Item], before: list[Answer], after: list[Answer], env: DemoEnv) -> Comparison:
        """Figures beyond the per-model metrics, from both models' answers (the open scenario's judge)."""
        ...


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


__all__ = ["Answer", "Comparison", "DemoEnv", "Item", "Rating", "Scenario", "mean"]
