"""`loraloop retrain` (run a recipe for an alias: export -> prepare -> train -> gate -> register), and the
base-model commands `loraloop init-model` and `loraloop quantize`. Errors are raised (core.errors); the
CLI's main prints them as one line with their exit code."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from core.errors import CommandError, ExitCode
from core.quantization import SCHEMES, get_scheme, read_scheme
from core.registry import RegistryConfig
from core.settings import PRESETS, Settings


def _overrides(items: list[str] | None) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise CommandError(f"--set needs KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def cmd_retrain(args: argparse.Namespace) -> int:
    # imported here: training pulls in transformers, peft and TRL, which every other command can do without
    from retrain.recipe import RecipeError, load_recipe
    from retrain.run import RunFailed, run_recipe

    settings: Settings = args.settings
    if args.recipe is None and args.resume is None:
        raise CommandError("--recipe is required (or --resume RUN_ID)")
    overrides = _overrides(args.set)
    recipe = None
    if args.recipe is not None:
        try:
            recipe = load_recipe(args.recipe, **overrides)
        except RecipeError as exc:
            raise CommandError(str(exc)) from exc
    output = recipe.output if recipe is not None else None
    registry = RegistryConfig(
        path=Path(args.registry) if args.registry else (output and output.registry_path) or settings.registry_path,
        adapter_root=Path(args.adapter_root) if args.adapter_root
        else (output and output.adapter_root) or settings.adapter_root,
    )  # fmt: skip
    try:
        result = run_recipe(
            args.recipe, alias=args.alias, since=args.since, resume=args.resume,
            store_root=Path(args.store) if args.store else settings.store.root,
            export_lag_s=settings.store.export_lag_s, registry=registry, max_lora_rank=settings.max_lora_rank,
            actor=args.actor, overrides=overrides,
        )  # fmt: skip
    except (RunFailed, RecipeError, FileNotFoundError) as exc:
        raise CommandError(f"retrain failed: {exc}") from exc
    if result.outcome == "registered":
        print(f"run {result.run_id}: registered {result.version} as candidate ({result.adapter_dir})")
        return ExitCode.OK
    if result.outcome == "skipped":
        print(f"run {result.run_id}: skipped, nothing trained: {result.reason}")
        return ExitCode.NOT_ENOUGH_DATA
    print(f"run {result.run_id}: gate failed; candidate kept in {result.adapter_dir}, nothing registered")
    return ExitCode.GATE_REJECTED


def cmd_init_model(args: argparse.Namespace) -> int:
    from retrain.models.prepare import build_tiny, prepare_smollm2

    dst = Path(args.dir)
    if dst.exists() and any(dst.iterdir()) and not args.force:
        raise CommandError(f"{dst} is not empty; pass --force to overwrite")
    if args.preset == "tiny":
        build_tiny(dst, seed=args.seed)
    else:
        prepare_smollm2(dst)
    print(f"prepared the {args.preset} model in {dst}")
    return ExitCode.OK


def cmd_quantize(args: argparse.Namespace) -> int:
    from retrain.models.quantize import quantize

    dst = quantize(Path(args.src), Path(args.dst), args.scheme, calibration_samples=args.samples, seed=args.seed,
                   allow_adapter_breaking=args.force, overwrite=args.overwrite)  # fmt: skip
    info = SCHEMES[read_scheme(dst) or get_scheme(args.scheme).name]
    hint = f"serve on CPU with --dtype {info.cpu_dtype}" if info.cpu_dtype else f"serve it where it runs: {info.runs}"
    print(f"quantized {args.src} with {info.name} into {dst} ({hint})")
    return ExitCode.OK


def _describe_schemes() -> str:
    rows = [f"  {s.name:<17} {s.runs:<22} {'calibrated' if s.needs_calibration else 'data-free':<11}"
            f"{'BREAKS ADAPTERS' if s.rescales_activations else ''}".rstrip() for s in SCHEMES.values()]  # fmt: skip
    return "schemes (where vLLM serves them, calibration, adapter safety):\n" + "\n".join(rows)


def _register_retrain(subparsers: Any) -> None:
    p = subparsers.add_parser("retrain", help="train, gate and register a new adapter version for an alias")
    p.add_argument("--alias", required=True, help="alias to retrain (e.g. support)")
    p.add_argument("--recipe", help="recipe YAML (see recipes/)")
    p.add_argument("--since", help="data watermark: an ISO time or a previous export's manifest.json")
    p.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--store", help="event store root (default: the recipe's data.store_root, else the settings')")
    p.add_argument("--registry", help="registry DuckDB file (default: the recipe's, else the settings' registry_path)")
    p.add_argument("--adapter-root", help="adapter root (default: the recipe's, else the settings' adapter_root)")
    p.add_argument("--actor", default="retrain", help="who is recorded in the registry's audit log")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field (train.max_steps=5)")
    p.set_defaults(func=cmd_retrain, needs_settings=True)


def _register_models(subparsers: Any) -> None:
    p = subparsers.add_parser("init-model", help="prepare a local model directory (no hub needed)")
    p.add_argument("dir", help="target directory")
    p.add_argument("--preset", choices=PRESETS, default="tiny", help="tiny (tests) or smollm2 (a real model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny preset")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty directory")
    p.set_defaults(func=cmd_init_model)

    p = subparsers.add_parser(
        "quantize", help="quantize a base model with llm-compressor (compressed-tensors, for vLLM)",
        description="Quantize a local Hugging Face model directory for vLLM; see docs/quantization.md.",
        epilog=_describe_schemes(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("src", help="unquantized model directory (config.json + safetensors)")
    p.add_argument("dst", help="output directory (written atomically)")
    p.add_argument("--scheme", required=True, help=f"one of: {', '.join(SCHEMES)}")
    p.add_argument("--samples", type=int, default=64, help="calibration samples (calibrated schemes only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration text")
    p.add_argument("--force", action="store_true",
                   help="allow schemes that rescale activations (breaks adapters trained on the base)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.set_defaults(func=cmd_quantize)


def register(subparsers: Any) -> None:
    """Add `retrain`, `init-model` and `quantize` to the main CLI."""
    _register_retrain(subparsers)
    _register_models(subparsers)


__all__ = ["cmd_init_model", "cmd_quantize", "cmd_retrain", "register"]
