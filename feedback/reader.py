"""The read side: a consistent, lock-free snapshot of the whole store in an in-memory DuckDB.

Any process may read at any time while writers write: sealed segments are immutable, WAL tails
are read once into memory (a torn last line is skipped), and a WAL whose table segment is already
sealed is ignored for that table, so nothing is counted twice by the store's own mechanics.
Duplicates that remain (at-least-once request logging, the same feedback id retried on two
replicas) are removed by the views: rows whose 64-bit id hash occurs twice are deduplicated
exactly by id; everything else passes untouched, so deduplication costs one sort of 8-byte hashes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np

from feedback.migrations import check_readable
from feedback.schema import TABLES, Table, read_wal_sql, sql_list
from feedback.segments import new_connection
from feedback.wal import list_segments, list_wals

log = logging.getLogger(__name__)

_WAL_WRITER = "split_part(filename, '/', -2)"


@dataclass
class Snapshot:
    """What a connection saw: file counts and duplicate counts per table."""

    segments: dict[str, int] = field(default_factory=dict)
    wal_files: int = 0
    wal_rows: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)


class StoreReader:
    """Read access to a store root; holds no locks and never writes.

    Views of :meth:`connect`: ``requests`` (deduplicated by request_id, latest copy wins),
    ``feedback`` (deduplicated by feedback_id, first copy wins; alias/experiment_id/arm/adapter
    filled from the request and ``matched`` false while the request is unknown),
    ``feedback_pending`` (the unmatched feedback), ``assignments``, ``adapter_changes``,
    ``experiments`` (latest version of each), and ``<table>_raw`` (everything, with duplicates).
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.snapshot = Snapshot()

    def connect(self, *, threads: int | None = None, retries: int = 50) -> duckdb.DuckDBPyConnection:
        """A new in-memory connection with the views over a snapshot taken now."""
        check_readable(self.root)
        con = new_connection(threads)
        for attempt in range(retries):
            try:
                self.snapshot = self._load(con)
                break
            except duckdb.IOException as exc:  # a WAL was sealed and removed while we read it
                log.debug("snapshot attempt %d failed: %s", attempt, exc)
        else:
            con.close()
            raise RuntimeError(f"could not take a consistent snapshot of {self.root} in {retries} attempts")
        self._experiments(con)
        return con

    # --- snapshot ----------------------------------------------------------------------------------

    def _load(self, con: duckdb.DuckDBPyConnection) -> Snapshot:
        snap = Snapshot()
        wals = list_wals(self.root)  # WALs first, segments second: see the module docs
        segments = {name: list_segments(self.root, name) for name in TABLES}
        con.execute("DROP TABLE IF EXISTS _wal")
        if wals:
            con.execute(
                f"CREATE TEMP TABLE _wal AS SELECT * FROM {read_wal_sql([str(w.path) for w in wals])} "
                "WHERE _t IS NOT NULL"
            )
        snap.wal_files = len(wals)
        for name, table in TABLES.items():
            sealed = {(s.writer, s.seq) for s in segments[name]}
            skip = [str(w.path) for w in wals if (w.writer, w.seq) in sealed]
            wal_table = f"_wal_{name}"
            if wals:
                where = f"_t = '{name}'" + (f" AND filename NOT IN ({sql_list(skip)[1:-1]})" if skip else "")
                con.execute(
                    f"CREATE OR REPLACE TEMP TABLE {wal_table} AS "
                    f"SELECT {table.select_sql(_WAL_WRITER)} FROM _wal WHERE {where}"
                )
            else:
                con.execute(table.ddl(wal_table))
            parts = [f"SELECT {table.column_list()} FROM {wal_table}"]
            files = [str(s.path) for s in segments[name]]
            if files:
                parts.insert(
                    0,
                    f"SELECT {table.column_list()} FROM read_parquet({sql_list(files)}, union_by_name = true)",
                )
            con.execute(f"CREATE OR REPLACE VIEW {name}_raw AS {' UNION ALL '.join(parts)}")
            snap.segments[name] = len(files)
            row = con.execute(f"SELECT count(*) FROM {wal_table}").fetchone()
            snap.wal_rows[name] = int(row[0]) if row else 0
            snap.duplicates[name] = self._dedup_view(con, table, "feedback_dedup" if name == "feedback" else name)
        con.execute("DROP TABLE IF EXISTS _wal")
        self._feedback_views(con)
        return snap

    @staticmethod
    def _dedup_view(con: duckdb.DuckDBPyConnection, table: Table, view: str) -> int:
        """Create ``view`` = ``<table>_raw`` without duplicate ids; returns how many hashes repeat."""
        hashes = con.execute(f"SELECT _h FROM {table.name}_raw").fetchnumpy()["_h"]
        dups = np.empty(0, dtype=np.uint64)
        if len(hashes) > 1:
            ordered = np.sort(np.asarray(hashes, dtype=np.uint64))
            dups = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
        if len(dups) == 0:
            con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM {table.name}_raw")
            return 0
        dup_table = f"_dups_{table.name}"
        con.execute(f"CREATE OR REPLACE TEMP TABLE {dup_table} (_h UBIGINT)")
        con.executemany(f"INSERT INTO {dup_table} VALUES (?)", [[int(h)] for h in dups])
        order = "logged_at DESC, writer DESC" if table.keep_latest else "logged_at ASC, writer ASC"
        con.execute(
            f"CREATE OR REPLACE VIEW {view} AS "
            f"SELECT * FROM {table.name}_raw WHERE _h NOT IN (SELECT _h FROM {dup_table}) "
            f"UNION ALL SELECT * FROM (SELECT * FROM {table.name}_raw "
            f"WHERE _h IN (SELECT _h FROM {dup_table}) "
            f'QUALIFY row_number() OVER (PARTITION BY "{table.key}" ORDER BY {order}) = 1)'
        )
        return len(dups)

    @staticmethod
    def _feedback_views(con: duckdb.DuckDBPyConnection) -> None:
        # Feedback not labelled with what served its request (written before the request was
        # visible to its writer) is joined with `requests` once, here; usually a small set, since
        # sealing labels most of it.
        con.execute(
            """
            CREATE OR REPLACE TEMP TABLE _feedback_unresolved AS
            SELECT f.* REPLACE (r.alias AS alias, r.experiment_id AS experiment_id, r.arm AS arm,
                                r.adapter AS adapter),
                   r.request_id IS NOT NULL AS matched
            FROM (SELECT * FROM feedback_dedup WHERE alias IS NULL) f
            LEFT JOIN (
                SELECT request_id, alias, experiment_id, arm, adapter FROM requests
                WHERE _h IN (SELECT _rh FROM feedback_dedup WHERE alias IS NULL)
            ) r ON r.request_id = f.request_id
            """
        )
        con.execute(
            "CREATE OR REPLACE VIEW feedback AS SELECT *, true AS matched FROM feedback_dedup "
            "WHERE alias IS NOT NULL UNION ALL SELECT * FROM _feedback_unresolved"
        )
        con.execute("CREATE OR REPLACE VIEW feedback_pending AS SELECT * FROM _feedback_unresolved WHERE NOT matched")

    def _experiments(self, con: duckdb.DuckDBPyConnection) -> None:
        from feedback.experiments import ExperimentRepo  # experiments import the reader's neighbours

        con.execute(
            "CREATE OR REPLACE TEMP TABLE experiments (id VARCHAR, alias VARCHAR, status VARCHAR, "
            'control VARCHAR, salt VARCHAR, start TIMESTAMPTZ, "end" TIMESTAMPTZ, primary_metric VARCHAR, '
            "arms JSON, guardrails JSON, version INTEGER, created TIMESTAMPTZ, updated TIMESTAMPTZ)"
        )
        rows = [
            [
                e.id,
                e.alias,
                e.status,
                e.control,
                e.salt,
                e.start,
                e.end,
                e.primary_metric,
                json.dumps([a.model_dump() for a in e.arms]),
                e.guardrails.model_dump_json(),
                e.version,
                e.created,
                e.updated,
            ]
            for e in ExperimentRepo(self.root).list()
        ]
        if rows:
            con.executemany("INSERT INTO experiments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    # --- conveniences ------------------------------------------------------------------------------

    def pending_feedback_count(self, con: duckdb.DuckDBPyConnection | None = None) -> int:
        """Feedback events whose request has not been logged (yet)."""
        own = con is None
        con = con or self.connect()
        try:
            row = con.execute("SELECT count(*) FROM feedback_pending").fetchone()
            return int(row[0]) if row else 0
        finally:
            if own:
                con.close()

    def counts(self) -> dict[str, int]:
        """Deduplicated row count of each table."""
        con = self.connect()
        try:
            out = {}
            for name in TABLES:
                row = con.execute(f"SELECT count(*) FROM {name}").fetchone()
                out[name] = int(row[0]) if row else 0
            return out
        finally:
            con.close()
