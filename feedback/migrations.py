"""Schema versions of a store and the upgrades between them.

``<root>/STORE.json`` records ``schema_version``. History:

* **1** — the prototype layout (no ``STORE.json``, or one saying 1): the same directories and file
  names, but segments lack the hash columns ``_h``/``_rh``, ``logged_at``, ``writer``,
  ``text_logged``, ``ttft_ms``, ``finish_reason``, feedback's ``value_num``/``value_text`` and
  its resolved alias/experiment/arm/adapter, assignment and adapter-change rows have no
  ``event_id``, feedback ``value`` is VARCHAR (holding JSON text), and WAL lines name their table
  in ``"table"`` instead of ``"_t"``.
* **2** — requests without ``choices``/``tools``/``tool_choice``/``response_format``, feedback without
  ``choice_index``.
* **3** — the current layout (feedback/schema.py).

A writer upgrades the store when it starts (under the root lock ``<root>/.store.lock``); readers
refuse a store whose version they do not know, with a one-line message.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import duckdb

from core.errors import LoraloopError
from feedback.fsutil import FileLock, atomic_write_bytes, fsync_dir
from feedback.schema import SCHEMA_VERSION, TABLES, WAL_COLUMNS, sql_str
from feedback.segments import new_connection, write_parquet
from feedback.wal import list_segments, list_wals

log = logging.getLogger(__name__)

STORE_FILE = "STORE.json"


class StoreVersionError(LoraloopError, RuntimeError):
    """The store was written by another schema version than this code reads."""


def read_version(root: Path) -> int | None:
    """The store's schema version; None for a new (empty) store."""
    try:
        data = json.loads((root / STORE_FILE).read_text())
        return int(data["schema_version"])
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreVersionError(f"{root / STORE_FILE} is unreadable: {exc}") from None
    if list_segments(root) or list_wals(root):
        return 1  # the prototype wrote no STORE.json
    return None


def check_readable(root: Path) -> None:
    """Raise StoreVersionError unless this code can read the store as it is."""
    version = read_version(root)
    if version is None or version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise StoreVersionError(
            f"event store {root} has schema version {version}; this loraloop reads {SCHEMA_VERSION}: upgrade loraloop"
        )
    raise StoreVersionError(
        f"event store {root} has schema version {version}; run `loraloop events migrate` "
        f"(or start a gateway) to upgrade it to {SCHEMA_VERSION}"
    )


def _write_store_file(root: Path, version: int) -> None:
    body = json.dumps({"format": "loraloop-event-store", "schema_version": version}, indent=2) + "\n"
    atomic_write_bytes(root / STORE_FILE, body.encode())


def ensure_current(root: Path) -> int:
    """Create or upgrade the store at ``root`` to SCHEMA_VERSION; returns the version found before."""
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / ".store.lock").held():
        found = read_version(root)
        if found is None:
            _write_store_file(root, SCHEMA_VERSION)
            return SCHEMA_VERSION
        if found > SCHEMA_VERSION:
            check_readable(root)
        version = found
        while version < SCHEMA_VERSION:
            log.warning("upgrading event store %s from schema %d to %d", root, version, version + 1)
            MIGRATIONS[version](root)
            version += 1
            _write_store_file(root, version)
        return found


# --- 1 -> 2 ---------------------------------------------------------------------------------------

_V1_EVENT_ID_FIELDS = {
    "assignments": ("ts", "experiment_id", "alias", "arm", "user", "request_id"),
    "adapter_changes": ("ts", "alias", "adapter", "previous", "actor", "reason"),
}


def _upgrade_segment_v1(con: duckdb.DuckDBPyConnection, path: Path, table: str, writer: str) -> bool:
    con.execute(f"CREATE OR REPLACE TEMP TABLE _m AS SELECT * FROM read_parquet({sql_str(str(path))})")
    existing = {str(r[0]): str(r[1]) for r in con.execute("DESCRIBE _m").fetchall()}
    if "_h" in existing:
        return False  # already upgraded (an interrupted migration is being resumed)
    for name, typ in WAL_COLUMNS.items():
        if name not in existing:
            con.execute(f'ALTER TABLE _m ADD COLUMN "{name}" {typ}')
        elif existing[name].upper() != typ:
            con.execute(f'ALTER TABLE _m ALTER "{name}" TYPE {typ}')
    con.execute("UPDATE _m SET logged_at = ts WHERE logged_at IS NULL")
    if table in _V1_EVENT_ID_FIELDS:
        fields = ", ".join(f"coalesce(CAST(\"{f}\" AS VARCHAR), '')" for f in _V1_EVENT_ID_FIELDS[table])
        con.execute(f"UPDATE _m SET event_id = md5(concat_ws('|', {fields})) WHERE event_id IS NULL")
    select = f"SELECT {TABLES[table].select_sql(sql_str(writer))} FROM _m"
    write_parquet(con, select, path, compression="zstd", fsync=True)
    con.execute("DROP TABLE _m")
    return True


def _upgrade_wal_v1(path: Path) -> None:
    lines = []
    with path.open("rb") as fh:
        for raw in fh:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue  # torn last line
            if not isinstance(obj, dict):
                continue
            if "_t" not in obj and "table" in obj:
                obj["_t"] = obj.pop("table")
            obj.setdefault("logged_at", obj.get("ts"))
            lines.append(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
    atomic_write_bytes(path, b"".join(lines))


def migrate_1_to_2(root: Path) -> None:
    """Rewrite every v1 segment with the v2 columns and every v1 WAL with v2 lines."""
    con = new_connection()
    try:
        upgraded = 0
        for seg in list_segments(root):
            if seg.table in TABLES:
                upgraded += _upgrade_segment_v1(con, seg.path, seg.table, seg.writer)
        for wal in list_wals(root):
            _upgrade_wal_v1(wal.path)
        for d in {s.path.parent for s in list_segments(root)}:
            fsync_dir(d)
        log.warning("upgraded %d segments of %s", upgraded, root)
    finally:
        con.close()


# --- 2 -> 3 ---------------------------------------------------------------------------------------


def _add_missing_columns(con: duckdb.DuckDBPyConnection, path: Path, table: str) -> bool:
    """Rewrite one segment with the columns it lacks (NULL); False when it has them all already."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE _m AS SELECT * FROM read_parquet({sql_str(str(path))})")
    existing = {str(r[0]) for r in con.execute("DESCRIBE _m").fetchall()}
    missing = [c for c in TABLES[table].columns if c.name not in existing]
    if not missing:
        con.execute("DROP TABLE _m")
        return False  # already upgraded (an interrupted migration is being resumed)
    for col in missing:
        con.execute(f'ALTER TABLE _m ADD COLUMN "{col.name}" {col.type}')
    columns = ", ".join(f'"{c.name}"' for c in TABLES[table].columns)
    write_parquet(con, f"SELECT {columns} FROM _m", path, compression="zstd", fsync=True)
    con.execute("DROP TABLE _m")
    return True


def migrate_2_to_3(root: Path) -> None:
    """Add the v3 columns (every choice, tools, response format; feedback's choice index) to every segment;
    WAL lines need nothing (a field a line lacks reads as NULL)."""
    con = new_connection()
    try:
        upgraded = 0
        for seg in list_segments(root):
            if seg.table in ("requests", "feedback"):
                upgraded += _add_missing_columns(con, seg.path, seg.table)
        for d in {s.path.parent for s in list_segments(root)}:
            fsync_dir(d)
        log.warning("upgraded %d segments of %s", upgraded, root)
    finally:
        con.close()


MIGRATIONS: dict[int, Callable[[Path], None]] = {1: migrate_1_to_2, 2: migrate_2_to_3}


def remove_temp_files(directory: Path) -> None:
    """Delete leftovers of interrupted atomic writes (``.*.tmp``) in a writer's own directory."""
    for entry in os.scandir(directory):
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            os.unlink(entry.path)
