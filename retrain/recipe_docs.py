"""Render docs/recipes.md from the recipe's pydantic models (every recipe and data-preparation field, with its
type, default and description), so the docs cannot drift from the code
(`python -m retrain.recipe_docs > docs/recipes.md`; a test checks the file is current)."""

from __future__ import annotations

from core.config_docs import reference
from retrain.recipe import Recipe

HEADER = [
    "# Recipe reference",
    "",
    "Generated from `retrain/recipe.py` and `retrain/config.py` by `python -m retrain.recipe_docs`; do not edit by",
    "hand. A recipe is one YAML file (`recipes/` has three to start from); `loraloop retrain --recipe FILE` and",
    "the nightly `loraloop cycle` (`cycle.aliases.<alias>.recipe`) run it. Unknown keys are refused, every value is",
    "validated when the recipe is loaded, and `--set KEY=VALUE` overrides one field (`--set train.max_steps=5`).",
    "How the steps use these sections: [retrain.md](retrain.md); the data stages:",
    "[data-preparation.md](data-preparation.md).",
]


def render() -> str:
    return reference(Recipe, HEADER)


if __name__ == "__main__":
    print(render())
