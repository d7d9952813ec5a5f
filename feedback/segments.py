"""Sealing: turn a closed WAL file into immutable Parquet segments (one per table)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import duckdb

from feedback.fsutil import fsync_dir, fsync_file
from feedback.schema import SCHEMA_VERSION, TABLES, read_wal_sql, sql_list, sql_str
from feedback.wal import list_segments, list_wals, segment_name

log = logging.getLogger(__name__)

_RESOLVE_COLS = ("alias", "experiment_id", "arm", "adapter")


def new_connection(threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with UTC session time zone."""
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    return con


def write_parquet(con: duckdb.DuckDBPyConnection, select: str, final: Path, *, compression: str, fsync: bool) -> None:
    """COPY ``select`` to ``final`` atomically: temp name, fsync, rename (the caller fsyncs the directory)."""
    tmp = final.with_name(f".{final.name}.tmp")
    con.execute(
        f"COPY ({select}) TO {sql_str(str(tmp))} (FORMAT parquet, COMPRESSION {compression}, "
        f"KV_METADATA {{loraloop_schema_version: '{SCHEMA_VERSION}'}})"
    )
    if fsync:
        fsync_file(tmp)
    os.replace(tmp, final)


def seal_wal(
    con: duckdb.DuckDBPyConnection,
    wal: Path,
    writer: str,
    seq: int,
    *,
    root: Path | None = None,
    compression: str = "zstd",
    fsync: bool = True,
) -> tuple[dict[str, int], int]:
    """Seal ``wal`` into ``<table>-<seq>.parquet`` files next to it, then delete it.

    Idempotent: a crash at any point leaves the WAL in place and sealing it again rewrites the same
    segment names. With ``root``, feedback rows whose request is known anywhere in the store get the
    request's alias/experiment/arm/adapter copied in. Returns (rows per table, torn lines skipped).
    """
    con.execute(f"CREATE OR REPLACE TEMP TABLE _seal AS SELECT * FROM {read_wal_sql([str(wal)])}")
    row = con.execute("SELECT count(*) FROM _seal WHERE _t IS NULL").fetchone()
    bad = int(row[0]) if row else 0
    con.execute("DELETE FROM _seal WHERE _t IS NULL")
    if root is not None:
        try:
            resolve_feedback(con, "_seal", root)
        except duckdb.Error as exc:  # best effort: readers resolve the rest
            log.debug("feedback resolution while sealing skipped: %s", exc)
    counts = {str(t): int(n) for t, n in con.execute("SELECT _t, count(*) FROM _seal GROUP BY _t").fetchall()}
    for table, n in counts.items():
        if table not in TABLES:
            log.warning("WAL %s has %d rows of unknown table %r; kept out of the segments", wal, n, table)
            continue
        select = f"SELECT {TABLES[table].select_sql(sql_str(writer))} FROM _seal WHERE _t = {sql_str(table)}"
        write_parquet(con, select, wal.parent / segment_name(table, seq), compression=compression, fsync=fsync)
    if fsync:
        fsync_dir(wal.parent)
    os.unlink(wal)
    if fsync:
        fsync_dir(wal.parent)
    con.execute("DROP TABLE _seal")
    return {t: n for t, n in counts.items() if t in TABLES}, bad


def lookup_requests(con: duckdb.DuckDBPyConnection, root: Path, want: str) -> None:
    """Create temp table ``_lookup`` (request_id + what served it) for the request ids in table ``want``.

    Scans the stored hash column of every requests segment (cheap) plus all WAL tails.
    """
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _want AS "
        f"SELECT DISTINCT request_id, md5_number_lower(request_id) AS _h "
        f"FROM {want}"
    )
    cols = "request_id, " + ", ".join(_RESOLVE_COLS) + ", logged_at"
    parts = []
    wals = [str(w.path) for w in list_wals(root)]
    segs = [str(s.path) for s in list_segments(root, "requests")]
    if segs:
        parts.append(
            f"SELECT {cols} FROM read_parquet({sql_list(segs)}, union_by_name = true) "
            "WHERE _h IN (SELECT _h FROM _want) AND request_id IN (SELECT request_id FROM _want)"
        )
    if wals:
        parts.append(
            f"SELECT {cols} FROM {read_wal_sql(wals)} "
            "WHERE _t = 'requests' AND request_id IN (SELECT request_id FROM _want)"
        )
    if not parts:
        con.execute(
            "CREATE OR REPLACE TEMP TABLE _lookup AS SELECT request_id, NULL::VARCHAR alias, "
            "NULL::VARCHAR experiment_id, NULL::VARCHAR arm, NULL::VARCHAR adapter FROM _want LIMIT 0"
        )
        return
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _lookup AS SELECT request_id, "
        + ", ".join(f"arg_max({c}, logged_at) AS {c}" for c in _RESOLVE_COLS)
        + f" FROM ({' UNION ALL '.join(parts)}) GROUP BY request_id"
    )


def resolve_feedback(con: duckdb.DuckDBPyConnection, table: str, root: Path) -> int:
    """Fill alias/experiment/arm/adapter of unresolved feedback rows of temp ``table``; returns the count."""
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _unresolved AS SELECT DISTINCT request_id FROM {table} "
        "WHERE _t = 'feedback' AND alias IS NULL"
    )
    row = con.execute("SELECT count(*) FROM _unresolved").fetchone()
    if not row or not row[0]:
        return 0
    lookup_requests(con, root, "_unresolved")
    sets = ", ".join(f"{c} = l.{c}" for c in _RESOLVE_COLS)
    con.execute(
        f"UPDATE {table} SET {sets} FROM _lookup l "
        f"WHERE {table}._t = 'feedback' AND {table}.alias IS NULL AND {table}.request_id = l.request_id"
    )
    filled = con.execute("SELECT count(*) FROM _lookup").fetchone()
    return int(filled[0]) if filled else 0
