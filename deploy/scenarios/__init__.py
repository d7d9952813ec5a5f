"""The demo's scenarios (`loraloop demo --scenario NAME`), one module each; deploy/demo.py drives them."""

from __future__ import annotations

from .base import Answer, Comparison, DemoEnv, Item, Rating, Scenario
from .open import OpenScenario
from .reviews import ReviewsScenario
from .tools import ToolsScenario

SCENARIOS: dict[str, type[ReviewsScenario] | type[ToolsScenario] | type[OpenScenario]] = {
    "reviews": ReviewsScenario, "tools": ToolsScenario, "open": OpenScenario,
}  # fmt: skip


def get_scenario(name: str, preset: str = "smollm2") -> Scenario:
    """The scenario called ``name`` (KeyError for an unknown one: the CLI offers only these names)."""
    return SCENARIOS[name](preset)


__all__ = ["SCENARIOS", "Answer", "Comparison", "DemoEnv", "Item", "Rating", "Scenario", "get_scenario"]
