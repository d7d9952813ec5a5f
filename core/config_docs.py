"""Render docs/configuration.md from the settings classes, so the docs cannot drift from the code
(`python -m core.config_docs > docs/configuration.md`; a test checks the file is current). ``reference`` renders
any pydantic model the same way (docs/recipes.md, from the recipe, by ``retrain.recipe_docs``)."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .settings import Settings


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) is dict:
        value = typing.get_args(annotation)[1]
        if isinstance(value, type) and issubclass(value, BaseModel):
            return value
    return None


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    text = str(annotation).replace("typing.", "").replace("pathlib.", "").replace("pydantic.types.", "")
    return re.sub(r"\bcore\.\w+\.", "", text.replace("NoneType", "None"))


def _default(field: Any) -> str:
    extra = field.json_schema_extra
    if isinstance(extra, dict) and "doc_default" in extra:
        return f"({extra['doc_default']})"
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "(computed)"
        if isinstance(value, BaseModel):
            return "(see below)"
        if isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
            return "`{" + ", ".join(f"{k!r}: {{}}" for k in value) + "}`"
        return f"`{value!r}`"
    if field.default is PydanticUndefined:
        return "required"
    if field.default is None:
        return "unset"
    return f"`{field.default}`" if isinstance(field.default, Path) else f"`{field.default!r}`"


def _rows(model: type[BaseModel], prefix: str, env_prefix: str | None, out: list[str],
          sections: list[tuple[str, type[BaseModel]]]) -> None:  # fmt: skip
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        sub = _submodel(annotation)
        is_map = typing.get_origin(annotation) is dict
        desc = (field.description or "").replace("|", "\\|")
        type_name = _type_name(annotation).replace("|", "\\|")
        cells = [f"`{key}`", type_name, _default(field)]
        if env_prefix is not None:
            env = env_prefix + key.replace(".", "__").upper() if not is_map else ""
            cells.append(env and f"`{env}`")
        out.append("| " + " | ".join([*cells, desc]) + " |")
        if sub is not None:
            sections.append((f"{key}.<name>" if is_map else key, sub))


def reference(root: type[BaseModel], header: list[str], env_prefix: str | None = None) -> str:
    """A Markdown reference of ``root``'s fields (type, default, environment variable when ``env_prefix`` is
    given, description), one section per nested model, breadth first, after the ``header`` lines."""
    lines = [*header, ""]
    columns = ["key", "type", "default", *(["environment"] if env_prefix is not None else []), "meaning"]
    queue: list[tuple[str, type[BaseModel]]] = [("", root)]
    while queue:
        prefix, model = queue.pop(0)
        title = prefix or "top level"
        lines += [f"## `{title}`", "", (model.__doc__ or "").strip().splitlines()[0], ""]
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        rows: list[str] = []
        found: list[tuple[str, type[BaseModel]]] = []
        _rows(model, f"{prefix}." if prefix else "", env_prefix, rows, found)
        lines += [*rows, ""]
        queue += found
    return "\n".join(lines)


def render() -> str:
    return reference(
        Settings,
        [
            "# Configuration reference",
            "",
            "Generated from `core/settings.py` by `python -m core.config_docs`; do not edit by hand.",
            "Sources, highest priority first: keyword overrides (CLI flags), `LORALOOP_*` environment variables",
            "(nested keys joined with `__`), the YAML file given with `--config`. Errors are reported as one line",
            "naming the field. Maps (`aliases`, `adapters`) are set in YAML, or in the environment as JSON.",
        ],
        env_prefix="LORALOOP_",
    )


if __name__ == "__main__":
    print(render())
