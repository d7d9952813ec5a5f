"""What the last nightly cycle did, kept in ``cycle.state_dir/last_cycle.json``: written by `loraloop cycle`
(deploy/cycle.py), read by every gateway replica's /metrics (serving/registry_metrics.py) and the CLI.

Each alias gets a list of actions, each a kind and a human-readable detail (never parsed back)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from core.errors import ExitCode

ActionKind = Literal["promote", "rollback", "timeout", "ramp", "pause", "continue", "skip", "retrain", "canary_started"]
#: Kinds that change what is served or trained: a cycle that did one of them exits ExitCode.ACTED.
ACTING: frozenset[str] = frozenset({"promote", "rollback", "timeout", "ramp", "canary_started"})
STATUS_FILE = "last_cycle.json"


@dataclass(frozen=True)
class CycleAction:
    """One thing the cycle did (or decided not to do) for an alias."""

    kind: ActionKind
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else self.kind

    @classmethod
    def from_json(cls, value: Any) -> CycleAction:
        """From the status file; a status written before actions had kinds holds ``"kind: detail"`` strings."""
        if isinstance(value, dict):
            return cls(value.get("kind", "continue"), str(value.get("detail", "")))
        kind, _, detail = str(value).partition(":")
        return cls(kind.strip(), detail.strip())  # type: ignore[arg-type]


@dataclass
class CycleResult:
    """One run of the cycle: the actions per alias, and the aliases that failed (with one line each)."""

    started_at: str
    finished_at: str = ""
    actions: dict[str, list[CycleAction]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> ExitCode:
        if self.failed:
            return ExitCode.FAILED
        acted = any(a.kind in ACTING for acts in self.actions.values() for a in acts)
        return ExitCode.ACTED if acted else ExitCode.OK


def write_status(state_dir: Path, result: CycleResult) -> None:
    """Replace the status file atomically; ``last_success_ts`` moves only when no alias failed."""
    status = {**asdict(result), "exit_code": int(result.exit_code), "finished_ts": time.time()}
    previous = read_status(state_dir)
    status["last_success_ts"] = status["finished_ts"] if not result.failed else previous.get("last_success_ts")
    path = state_dir / STATUS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status, indent=2))
    os.replace(tmp, path)


def read_status(state_dir: Path) -> dict[str, Any]:
    """The last status as written ({} when there is none or it is unreadable)."""
    try:
        data: dict[str, Any] = json.loads((state_dir / STATUS_FILE).read_text())
        return data
    except (OSError, ValueError):
        return {}


def last_actions(status: dict[str, Any]) -> dict[str, list[CycleAction]]:
    """The status's actions per alias, as CycleAction objects."""
    return {alias: [CycleAction.from_json(a) for a in acts] for alias, acts in (status.get("actions") or {}).items()}


__all__ = ["ACTING", "ActionKind", "CycleAction", "CycleResult", "last_actions", "read_status", "write_status"]
