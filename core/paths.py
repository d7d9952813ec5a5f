"""Where loraloop keeps its files by default: declared once here, used by the settings, the recipe and the
CLIs. Every one of them can be moved in the settings (docs/configuration.md) or the recipe (docs/retrain.md);
relative paths are relative to the working directory."""

from __future__ import annotations

from pathlib import Path

#: Everything a working directory's loop writes, unless the settings say otherwise.
STATE_ROOT = Path(".loraloop")
#: The event store root (`store.root`).
EVENTS_ROOT = STATE_ROOT / "events"
#: The adapter registry's DuckDB file (`registry_path`); the runs table lives beside it (`runs_path`).
REGISTRY_PATH = STATE_ROOT / "registry.duckdb"
#: Runtime changes of a gateway (registered adapters, alias pointers) kept across restarts (`state_dir`).
GATEWAY_STATE_DIR = STATE_ROOT / "state"
#: The nightly cycle's lock file, and its last status (`cycle.state_dir`).
CYCLE_STATE_DIR = STATE_ROOT / "cycle"
#: One directory per training run (`output.runs_dir` of a recipe).
RUNS_DIR = STATE_ROOT / "runs"
#: Adapter directories: the gateway loads only adapters under it, and retraining publishes versions there.
ADAPTER_ROOT = Path("adapters")
#: Prepared base models (presets), once per machine.
MODEL_CACHE_DIR = Path("~/.cache/loraloop/models")


def runs_path(registry_path: Path) -> Path:
    """The runs table's DuckDB file, beside the registry's."""
    return Path(registry_path).with_name("runs.duckdb")


__all__ = [
    "ADAPTER_ROOT", "CYCLE_STATE_DIR", "EVENTS_ROOT", "GATEWAY_STATE_DIR", "MODEL_CACHE_DIR", "REGISTRY_PATH",
    "RUNS_DIR", "STATE_ROOT", "runs_path",
]  # fmt: skip
