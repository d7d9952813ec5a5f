"""Run records: every retrain run in a DuckDB table (``runs.duckdb`` next to the registry file), written
through short-lived connections under an exclusive file lock. The retrain job writes them; the cycle, the
CLI and (later) the console read them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from core.registry import locked_duckdb

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY, alias VARCHAR NOT NULL, recipe_name VARCHAR, recipe_path VARCHAR,
    recipe_hash VARCHAR NOT NULL, recipe JSON, method VARCHAR, since VARCHAR, data_watermark VARCHAR,
    row_counts JSON, hyperparams JSON, epochs JSON, search JSON, eval JSON, gate JSON, passed BOOLEAN,
    adapter_version VARCHAR, run_dir VARCHAR, started_at TIMESTAMPTZ NOT NULL, finished_at TIMESTAMPTZ,
    duration_s DOUBLE, outcome VARCHAR NOT NULL, error VARCHAR
);
"""
_JSON = ("recipe", "row_counts", "hyperparams", "epochs", "search", "eval", "gate")
#: Outcomes: running, registered (gate passed), rejected (gate failed), skipped (not enough data: nothing
#: trained), failed, interrupted.
OUTCOMES = ("running", "registered", "rejected", "skipped", "failed", "interrupted")


class RunRecords:
    """The runs table."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with locked_duckdb(self.path) as con:
            yield con

    def start(self, run_id: str, alias: str, **fields: Any) -> None:
        """Insert a run (outcome ``running``), or mark an existing one (a resume) running again."""
        now = datetime.now(UTC)
        with self._connect() as con:
            exists = con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone()
            if exists is None:
                con.execute(
                    "INSERT INTO runs (run_id, alias, recipe_hash, started_at, outcome) VALUES (?, ?, ?, ?, 'running')",
                    [run_id, alias, fields.get("recipe_hash", ""), now],
                )
        self.update(run_id, outcome="running", error=None, **fields)

    def update(self, run_id: str, **fields: Any) -> None:
        if not fields:
            return
        sets, values = [], []
        for key, value in fields.items():
            sets.append(f"{key} = ?")
            values.append(json.dumps(value, default=str) if key in _JSON and value is not None else value)
        with self._connect() as con:
            con.execute(f"UPDATE runs SET {', '.join(sets)} WHERE run_id = ?", [*values, run_id])

    def finish(self, run_id: str, outcome: str, *, duration_s: float, error: str | None = None, **fields: Any) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        self.update(run_id, outcome=outcome, error=error, duration_s=duration_s, finished_at=datetime.now(UTC),
                    **fields)  # fmt: skip

    def get(self, run_id: str) -> dict[str, Any] | None:
        with self._connect() as con:
            cur = con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id])
            row = cur.fetchone()
            names = [d[0] for d in cur.description] if cur.description else []
        if row is None:
            return None
        out = dict(zip(names, row, strict=True))
        for key in _JSON:
            if isinstance(out.get(key), str):
                out[key] = json.loads(out[key])
        return out

    def list(self, alias: str | None = None) -> list[dict[str, Any]]:
        sql = (
            "SELECT run_id, alias, outcome, adapter_version, recipe_hash, data_watermark, duration_s, started_at "
            "FROM runs"
        )
        params: list[Any] = []
        if alias:
            sql += " WHERE alias = ?"
            params.append(alias)
        with self._connect() as con:
            cur = con.execute(sql + " ORDER BY started_at", params)
            names = [d[0] for d in cur.description] if cur.description else []
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


__all__ = ["OUTCOMES", "RunRecords"]
