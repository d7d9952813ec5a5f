"""`loraloop retrain`: run a recipe for an alias (export -> prepare -> train -> gate -> register)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from deploy.registry import RegistryConfig


def cmd_retrain(args: argparse.Namespace) -> int:
    from deploy.cli import CommandError
    from retrain.recipe import RecipeError, load_recipe
    from retrain.run import RunFailed, run_recipe

    settings: Any = getattr(args, "settings", None)
    if args.recipe is None and args.resume is None:
        raise CommandError("--recipe is required (or --resume RUN_ID)")
    overrides: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise CommandError(f"--set needs KEY=VALUE, got {item!r}")
        import yaml

        overrides[key] = yaml.safe_load(value)
    recipe = None
    if args.recipe is not None:
        try:
            recipe = load_recipe(args.recipe, **overrides)
        except RecipeError as exc:
            raise CommandError(str(exc)) from exc
    default = RegistryConfig()
    adapter_root = (
        Path(args.adapter_root) if args.adapter_root
        else recipe.output.adapter_root if recipe and recipe.output.adapter_root
        else settings.adapter_root if settings is not None else default.adapter_root
    )  # fmt: skip
    registry_path = (
        Path(args.registry) if args.registry
        else recipe.output.registry_path if recipe and recipe.output.registry_path
        else settings.registry_path if settings is not None else default.path
    )  # fmt: skip
    store_root = (
        Path(args.store) if args.store
        else None if recipe and recipe.data.store_root
        else settings.store.root if settings is not None else None
    )  # fmt: skip
    max_rank = settings.max_lora_rank if settings is not None else 16
    try:
        result = run_recipe(
            args.recipe, alias=args.alias, since=args.since, resume=args.resume,
            store_root=store_root,
            registry=RegistryConfig(path=registry_path, adapter_root=adapter_root), max_lora_rank=max_rank,
            actor=args.actor, overrides=overrides,
        )  # fmt: skip
    except (RunFailed, RecipeError, FileNotFoundError) as exc:
        raise CommandError(f"retrain failed: {exc}") from exc
    if result.outcome == "registered":
        print(f"run {result.run_id}: registered {result.version} as candidate ({result.adapter_dir})")
        return 0
    print(f"run {result.run_id}: gate failed; candidate kept in {result.adapter_dir}, nothing registered")
    return 3


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("retrain", help="train, gate and register a new adapter version for an alias")
    p.add_argument("--config", dest="config", default=argparse.SUPPRESS, help="YAML settings file")
    p.add_argument("--alias", required=True, help="alias to retrain (e.g. support)")
    p.add_argument("--recipe", help="recipe YAML (see recipes/)")
    p.add_argument("--since", help="data watermark: an ISO time or a previous export's manifest.json")
    p.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--store", help="event store root (default: the recipe's data.store_root or ./.loraloop/events)")
    p.add_argument("--registry", help="registry DuckDB file (default ./.loraloop/registry.duckdb)")
    p.add_argument("--adapter-root", help="adapter root (default: the settings' adapter_root)")
    p.add_argument("--actor", default="retrain", help="who is recorded in the registry's audit log")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field (train.max_steps=5)")
    p.set_defaults(func=cmd_retrain, needs_settings=True)


__all__ = ["cmd_retrain", "register"]
