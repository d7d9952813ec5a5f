"""Adapter registry: versions per alias, their lineage and status, and an audit log of every transition.

Stored in one DuckDB file. Every call opens a short-lived connection under an exclusive ``fcntl`` lock on
``<path>.lock``, so several processes (the retrain job, the promotion controller, an operator's CLI) can
share the file without anyone holding DuckDB's write lock for long.

Statuses and allowed transitions::

    candidate -> rejected | canary | champion
    canary    -> champion | rejected | retired
    champion  -> retired | rejected   (rejected: rolled back)
    retired   -> champion             (a rollback reinstates a previous champion)
    rejected: final

Promoting a version to ``champion`` retires the alias's previous champion in the same transaction (both
transitions are audited).
"""

from __future__ import annotations

import builtins
import fcntl
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import duckdb
from pydantic import BaseModel, Field

from core import paths
from core.errors import UsageError

Status = Literal["candidate", "rejected", "canary", "champion", "retired"]
STATUSES: tuple[str, ...] = ("candidate", "rejected", "canary", "champion", "retired")
TRANSITIONS: dict[str, frozenset[str]] = {
    "candidate": frozenset({"rejected", "canary", "champion"}),
    "canary": frozenset({"champion", "rejected", "retired"}),
    "champion": frozenset({"retired", "rejected"}),
    "rejected": frozenset(),
    # a rollback reinstates the previous champion (it stays loadable: no retraining)
    "retired": frozenset({"champion"}),
}
_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapter_versions (
    version VARCHAR PRIMARY KEY, alias VARCHAR NOT NULL, number INTEGER NOT NULL, path VARCHAR NOT NULL,
    status VARCHAR NOT NULL, parent VARCHAR, base_model VARCHAR NOT NULL, base_revision VARCHAR,
    data_watermark VARCHAR, recipe_hash VARCHAR, run_id VARCHAR, metrics JSON,
    created_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS adapter_audit (
    seq BIGINT NOT NULL, version VARCHAR NOT NULL, alias VARCHAR NOT NULL, from_status VARCHAR,
    to_status VARCHAR NOT NULL, actor VARCHAR NOT NULL, reason VARCHAR NOT NULL, figures JSON,
    "at" TIMESTAMPTZ NOT NULL
);
"""


class RegistryError(UsageError, ValueError):
    """An unknown version or a refused transition."""


class RegistryConfig(BaseModel):
    """Where the registry lives."""

    path: Path = Field(paths.REGISTRY_PATH, description="The registry's DuckDB file.")
    adapter_root: Path = Field(
        paths.ADAPTER_ROOT,
        description="Adapter root (the gateway's `adapter_root`); versions live in `<root>/<version>`.",
    )


class AdapterVersion(BaseModel):
    """One registered adapter version."""

    alias: str = Field(description="The alias this adapter serves (e.g. `support`).")
    version: str = Field(description="Unique version name, `<alias>-v<number>` (e.g. `support-v3`).")
    number: int = Field(description="Version number within the alias, from 1.")
    path: str = Field(description="Adapter directory (under the adapter root).")
    status: Status = Field(description="candidate / rejected / canary / champion / retired.")
    parent: str | None = Field(None, description="Version it was warm-started from, if any.")
    base_model: str = Field(description="Base model path or id it was trained on.")
    base_revision: str | None = Field(None, description="Revision (hash) of the base model's weights/config.")
    data_watermark: str | None = Field(None, description="Watermark of the training data export.")
    recipe_hash: str | None = Field(None, description="sha256 of the recipe that produced it.")
    run_id: str | None = Field(None, description="The training run that produced it.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Headline metrics (holdout, gate).")
    created_at: datetime = Field(description="When it was registered.")
    updated_at: datetime = Field(description="Last status change.")


_COLS = (
    "alias, version, number, path, status, parent, base_model, base_revision, data_watermark, recipe_hash, "
    "run_id, metrics, created_at, updated_at"
)


def _now() -> datetime:
    return datetime.now(UTC)


def _row(r: tuple[Any, ...]) -> AdapterVersion:
    keys = [c.strip() for c in _COLS.split(",")]
    d = dict(zip(keys, r, strict=True))
    d["metrics"] = json.loads(d["metrics"]) if d["metrics"] else {}
    return AdapterVersion(**d)


@contextmanager
def locked_duckdb(path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived connection to a DuckDB file under an exclusive ``fcntl`` lock on ``<path>.lock``, so
    several processes can share the file without anyone holding DuckDB's write lock for long."""
    with path.with_name(path.name + ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            con = duckdb.connect(str(path))
            try:
                yield con
            finally:
                con.close()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Registry:
    """The adapter registry (see the module docs). All methods are process-safe."""

    def __init__(self, cfg: RegistryConfig) -> None:
        self.cfg = cfg
        self.path = Path(cfg.path)
        self.adapter_root = Path(cfg.adapter_root)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as con:
            con.execute(_SCHEMA)

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection to the registry file, under the exclusive file lock."""
        with locked_duckdb(self.path) as con:
            yield con

    # --- queries -----------------------------------------------------------------------------------

    def next_version(self, alias: str) -> tuple[str, int]:
        """The name and number the alias's next version will get (e.g. ``("support-v3", 3)``)."""
        if not _ALIAS.match(alias):
            raise RegistryError(f"invalid alias {alias!r}")
        with self.connect() as con:
            return self._next(con, alias)

    @staticmethod
    def _next(con: duckdb.DuckDBPyConnection, alias: str) -> tuple[str, int]:
        row = con.execute("SELECT coalesce(max(number), 0) FROM adapter_versions WHERE alias = ?", [alias]).fetchone()
        n = int(row[0] if row else 0) + 1
        return f"{alias}-v{n}", n

    def get(self, version: str) -> AdapterVersion:
        with self.connect() as con:
            return self._get(con, version)

    @staticmethod
    def _get(con: duckdb.DuckDBPyConnection, version: str) -> AdapterVersion:
        row = con.execute(f"SELECT {_COLS} FROM adapter_versions WHERE version = ?", [version]).fetchone()
        if row is None:
            raise RegistryError(f"unknown adapter version {version!r}")
        return _row(row)

    def list(self, alias: str | None = None, status: str | None = None) -> builtins.list[AdapterVersion]:
        """Versions, oldest first, optionally of one alias and/or with one status."""
        where, params = [], []
        if alias is not None:
            where.append("alias = ?")
            params.append(alias)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        sql = f"SELECT {_COLS} FROM adapter_versions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self.connect() as con:
            rows = con.execute(sql + " ORDER BY alias, number", params).fetchall()
        return [_row(r) for r in rows]

    def champion(self, alias: str) -> AdapterVersion | None:
        found = self.list(alias, "champion")
        return found[-1] if found else None

    def audit(self, alias: str | None = None) -> builtins.list[dict[str, Any]]:
        """Every transition (registration included, ``from_status`` None), oldest first."""
        sql = 'SELECT seq, version, alias, from_status, to_status, actor, reason, figures, "at" FROM adapter_audit'
        params: list[Any] = []
        if alias is not None:
            sql += " WHERE alias = ?"
            params.append(alias)
        with self.connect() as con:
            rows = con.execute(sql + " ORDER BY seq", params).fetchall()
        keys = ("seq", "version", "alias", "from_status", "to_status", "actor", "reason", "figures", "at")
        out = []
        for r in rows:
            d = dict(zip(keys, r, strict=True))
            d["figures"] = json.loads(d["figures"]) if d["figures"] else {}
            out.append(d)
        return out

    # --- changes -----------------------------------------------------------------------------------

    @staticmethod
    def _audit(
        con: duckdb.DuckDBPyConnection,
        v: AdapterVersion,
        frm: str | None,
        to: str,
        actor: str,
        reason: str,
        figures: dict[str, Any] | None,
        at: datetime,
    ) -> None:
        row = con.execute("SELECT coalesce(max(seq), 0) FROM adapter_audit").fetchone()
        seq = int(row[0] if row else 0) + 1
        con.execute(
            "INSERT INTO adapter_audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [seq, v.version, v.alias, frm, to, actor, reason, json.dumps(figures or {}, default=str), at],
        )

    def register_candidate(
        self,
        alias: str,
        path: Path | str,
        *,
        base_model: str,
        version: str | None = None,
        parent: str | None = None,
        base_revision: str | None = None,
        data_watermark: str | None = None,
        recipe_hash: str | None = None,
        run_id: str | None = None,
        metrics: dict[str, Any] | None = None,
        actor: str = "retrain",
        reason: str = "trained",
        status: Status = "candidate",
    ) -> AdapterVersion:
        """Register a new version of ``alias`` (status ``candidate``, or ``rejected`` to keep a record of a
        gate failure). ``version`` defaults to :meth:`next_version`; a given one must be that next name."""
        if status not in ("candidate", "rejected"):
            raise RegistryError(f"a new version starts as candidate or rejected, not {status!r}")
        if not _ALIAS.match(alias):
            raise RegistryError(f"invalid alias {alias!r}")
        now = _now()
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                name, number = self._next(con, alias)
                if version is not None and version != name:
                    raise RegistryError(f"version {version!r} is not the next version of {alias!r} ({name!r})")
                if parent is not None:
                    self._get(con, parent)
                v = AdapterVersion(
                    alias=alias, version=name, number=number, path=str(path), status=status, parent=parent,
                    base_model=base_model, base_revision=base_revision, data_watermark=data_watermark,
                    recipe_hash=recipe_hash, run_id=run_id, metrics=metrics or {}, created_at=now, updated_at=now,
                )  # fmt: skip
                con.execute(
                    f"INSERT INTO adapter_versions ({_COLS}) VALUES ({', '.join('?' * 14)})",
                    [
                        v.alias, v.version, v.number, v.path, v.status, v.parent, v.base_model, v.base_revision,
                        v.data_watermark, v.recipe_hash, v.run_id, json.dumps(v.metrics, default=str), now, now,
                    ],
                )  # fmt: skip
                self._audit(con, v, None, status, actor, reason, metrics, now)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return v

    def audit_event(self, version: str, *, actor: str, reason: str, figures: dict[str, Any] | None = None) -> None:
        """Record a step that changes no status (a canary ramp, a paused decision) in the audit log."""
        with self.connect() as con:
            v = self._get(con, version)
            self._audit(con, v, v.status, v.status, actor, reason, figures, _now())

    def transition(
        self, version: str, to_status: str, *, actor: str, reason: str, figures: dict[str, Any] | None = None
    ) -> AdapterVersion:
        """Move ``version`` to ``to_status`` (see TRANSITIONS; others raise RegistryError), audited with who,
        why and the figures. A new champion retires the previous one."""
        if to_status not in STATUSES:
            raise RegistryError(f"unknown status {to_status!r}; one of {', '.join(STATUSES)}")
        if not actor or not reason:
            raise RegistryError("a transition needs an actor and a reason")
        now = _now()
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                v = self._get(con, version)
                if to_status not in TRANSITIONS[v.status]:
                    raise RegistryError(f"{version}: transition {v.status} -> {to_status} is not allowed")
                if to_status == "champion":
                    rows = con.execute(
                        f"SELECT {_COLS} FROM adapter_versions WHERE alias = ? AND status = 'champion'", [v.alias]
                    ).fetchall()
                    for old in map(_row, rows):
                        con.execute(
                            "UPDATE adapter_versions SET status = 'retired', updated_at = ? WHERE version = ?",
                            [now, old.version],
                        )
                        self._audit(con, old, "champion", "retired", actor, f"replaced by {version}: {reason}",
                                    figures, now)  # fmt: skip
                con.execute(
                    "UPDATE adapter_versions SET status = ?, updated_at = ? WHERE version = ?",
                    [to_status, now, version],
                )
                self._audit(con, v, v.status, to_status, actor, reason, figures, now)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return v.model_copy(update={"status": to_status, "updated_at": now})


__all__ = ["STATUSES", "TRANSITIONS", "AdapterVersion", "Registry", "RegistryConfig", "RegistryError", "Status"]
