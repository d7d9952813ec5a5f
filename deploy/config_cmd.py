"""`loraloop config check [FILE]` and `loraloop config show`: the settings checked and shown without side
effects (nothing is created, prepared, started or called).

``check`` names every problem on a line of its own (validation errors first, then what only exists on this
machine: the model, adapter directories, recipes, paths) and exits 2 when there is one; warnings do not fail.
``show`` prints the effective value of every setting, where it came from (default, file or environment
variable) and secrets masked."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.errors import ConfigError, ExitCode, LoraloopError
from core.quantization import check_adapter_compatibility
from core.settings import Settings, load_settings

ENV_PREFIX = "LORALOOP_"


@dataclass(frozen=True)
class Finding:
    level: str  # "error" or "warning"
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.where}: {self.message}"


def _writable_location(path: Path) -> str | None:
    """Why ``path`` could not be created or written here (None when it can); nothing is created."""
    path = path.expanduser()
    if path.exists():
        if not path.is_dir():
            return f"{path} exists and is not a directory"
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK):
        return f"{path} cannot be created ({parent} is not writable)"
    return None


def _check_model(settings: Settings) -> list[Finding]:
    from retrain.models.prepare import describe_model

    try:
        kind = describe_model(settings.model)
    except LoraloopError as exc:
        return [Finding("error", "model", exc.one_line())]
    if kind == "hub id" and settings.backends.mode == "managed":
        return [Finding("warning", "model", f"{settings.model!r} is a hub id: the managed vLLM downloads it")]
    return []


def _check_adapters(settings: Settings) -> list[Finding]:
    out = []
    root = settings.adapter_root.expanduser().absolute()
    for name, adapter in settings.adapters.items():
        path = adapter.path.expanduser()
        path = (path if path.is_absolute() else root / path).resolve()
        if root.resolve() not in (path, *path.parents):
            out.append(Finding("error", f"adapters.{name}.path", f"{path} is outside adapter_root {root}"))
        elif not (path / "adapter_config.json").is_file():
            out.append(Finding("error", f"adapters.{name}.path", f"{path} has no adapter_config.json"))
    try:
        check_adapter_compatibility(settings.quantization, bool(settings.adapters))
    except LoraloopError as exc:
        out.append(Finding("error", "quantization", exc.one_line()))
    return out


def _check_cycle(settings: Settings) -> list[Finding]:
    from retrain.recipe import load_recipe

    out = []
    for alias, spec in settings.cycle.aliases.items():
        if alias not in settings.aliases:
            out.append(Finding("error", f"cycle.aliases.{alias}", "is not an alias in `aliases`"))
        try:
            recipe = load_recipe(spec.recipe)
        except LoraloopError as exc:
            out.append(Finding("error", f"cycle.aliases.{alias}.recipe", exc.one_line()))
            continue
        prepare = recipe.data.prepare
        enough = prepare.min_rows / (1 - prepare.splits.validation - prepare.splits.holdout)
        if spec.min_new_rows < enough:  # the cycle would start runs that stop at min_rows
            out.append(Finding("warning", f"cycle.aliases.{alias}.min_new_rows",
                               f"{spec.min_new_rows} < {enough:.0f} (the recipe's min_rows {prepare.min_rows} "
                               f"over its train share): quiet nights will start runs that then skip"))  # fmt: skip
    if settings.cycle.aliases and settings.admin_key is None:
        out.append(Finding("error", "admin_key", "the nightly cycle needs the admin key (LORALOOP_ADMIN_KEY)"))
    return out


def _check_paths(settings: Settings) -> list[Finding]:
    places = {"store.root": settings.store.root, "registry_path": settings.registry_path.parent,
              "state_dir": settings.state_dir, "cycle.state_dir": settings.cycle.state_dir,
              "model_cache_dir": settings.cache_dir}  # fmt: skip
    return [Finding("error", where, why) for where, path in places.items() if (why := _writable_location(path))]


def check_settings(settings: Settings) -> list[Finding]:
    """Everything that valid settings can still get wrong on this machine."""
    return [*_check_model(settings), *_check_adapters(settings), *_check_cycle(settings), *_check_paths(settings)]


def _config_file(args: argparse.Namespace) -> str | None:
    return getattr(args, "file", None) or getattr(args, "config", None)


def cmd_config_check(args: argparse.Namespace) -> int:
    file = _config_file(args)
    try:
        settings = load_settings(file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}")
        raise ConfigError(f"{len(exc.problems)} problem(s) in the settings{f' ({file})' if file else ''}") from None
    findings = check_settings(settings)
    for finding in findings:
        print(finding)
    errors = [f for f in findings if f.level == "error"]
    if errors:
        raise ConfigError(f"{len(errors)} problem(s) in the settings{f' ({file})' if file else ''}")
    print(f"settings OK ({file or 'defaults and environment'}): model {settings.model!r}, "
          f"aliases {', '.join(settings.aliases)}; store {settings.store.root.absolute()}, "
          f"registry {settings.registry_path.absolute()}, adapters {settings.adapter_root.absolute()}")  # fmt: skip
    return ExitCode.OK


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def setting_sources(file: str | None) -> dict[str, str]:
    """Where each explicitly set key comes from: ``env LORALOOP_…`` or ``file``, by dotted key (a key set as a
    whole, e.g. an alias map in JSON, covers everything below it)."""
    sources: dict[str, str] = {}
    if file is not None:
        data = yaml.safe_load(Path(file).read_text()) or {}
        sources.update({key: "file" for key in _flatten(data)})
    for name in os.environ:
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            sources[name[len(ENV_PREFIX) :].lower().replace("__", ".")] = f"env {name}"
    return sources


def _source(key: str, sources: dict[str, str]) -> str:
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if (found := sources.get(".".join(parts[:n]))) is not None:
            return found
    return "default"


def cmd_config_show(args: argparse.Namespace) -> int:
    file = _config_file(args)
    settings = load_settings(file)
    values = _flatten(settings.model_dump(mode="json"))  # SecretStr fields dump as '**********'
    sources = setting_sources(file)
    rows = [{"key": k, "value": v, "source": _source(k, sources)} for k, v in values.items()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return ExitCode.OK
    width = max(len(r["key"]) for r in rows)
    for r in rows:
        print(f"{r['key']:<{width}}  {json.dumps(r['value'])}  ({r['source']})")
    return ExitCode.OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="check the settings, or show the effective ones (no side effects)")
    actions = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    c = actions.add_parser("check", help="validate and resolve the settings; one line per problem, exit 2 on errors")
    c.add_argument("file", nargs="?", help="YAML settings file (default: --config)")
    c.set_defaults(func=cmd_config_check)
    s = actions.add_parser("show", help="every setting's effective value and its source, secrets masked")
    s.add_argument("file", nargs="?", help="YAML settings file (default: --config)")
    s.add_argument("--json", action="store_true", help="JSON rows (key, value, source)")
    s.set_defaults(func=cmd_config_show)
