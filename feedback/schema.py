"""Table layout of the store: column types, and the SQL that turns WAL lines into table rows.

Every table has an id column (the deduplication key) and ``_h``, a stable 64-bit hash of that id
(``md5_number_lower``), stored so that readers can find duplicates and join without hashing strings.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Version of the on-disk layout written by this code; see feedback/migrations.py.
SCHEMA_VERSION = 3


@dataclass(frozen=True)
class Column:
    """One column: name, DuckDB type and the expression computing it from a raw WAL row."""

    name: str
    type: str
    expr: str | None = None  # None: the WAL field of the same name


@dataclass(frozen=True)
class Table:
    """One event table."""

    name: str
    key: str
    keep_latest: bool  # dedup: keep the latest logged copy (True) or the first one (False)
    columns: tuple[Column, ...]

    def select_sql(self, writer_expr: str) -> str:
        """Select list turning raw WAL rows into this table's columns (types enforced)."""
        parts = []
        for col in self.columns:
            expr = col.expr or _quote(col.name)
            expr = expr.replace("{writer}", writer_expr)
            parts.append(f"CAST({expr} AS {col.type}) AS {_quote(col.name)}")
        return ", ".join(parts)

    def column_list(self) -> str:
        """Comma-separated quoted column names."""
        return ", ".join(_quote(c.name) for c in self.columns)

    def ddl(self, name: str) -> str:
        """CREATE TABLE statement for an empty table with this schema."""
        cols = ", ".join(f"{_quote(c.name)} {c.type}" for c in self.columns)
        return f"CREATE OR REPLACE TEMP TABLE {name} ({cols})"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql_str(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def sql_list(values: list[str]) -> str:
    """A SQL list literal of strings."""
    return "[" + ", ".join(sql_str(v) for v in values) + "]"


TS = "TIMESTAMPTZ"
_COMMON_TAIL = (Column("writer", "VARCHAR", "{writer}"),)

REQUESTS = Table(
    "requests",
    key="request_id",
    keep_latest=True,
    columns=(
        Column("request_id", "VARCHAR"),
        Column("ts", TS),
        Column("logged_at", TS),
        Column("alias", "VARCHAR"),
        Column("endpoint", "VARCHAR"),
        Column("experiment_id", "VARCHAR"),
        Column("arm", "VARCHAR"),
        Column("adapter", "VARCHAR"),
        Column("user", "VARCHAR"),
        Column("messages", "JSON"),
        Column("prompt", "VARCHAR"),
        Column("completion", "VARCHAR"),
        Column("choices", "JSON"),
        Column("tools", "JSON"),
        Column("tool_choice", "JSON"),
        Column("response_format", "JSON"),
        Column("text_logged", "BOOLEAN", "coalesce(text_logged, true)"),
        Column("params", "JSON"),
        Column("prompt_tokens", "INTEGER"),
        Column("completion_tokens", "INTEGER"),
        Column("latency_ms", "DOUBLE"),
        Column("ttft_ms", "DOUBLE"),
        Column("status", "INTEGER"),
        Column("error", "VARCHAR"),
        Column("stream", "BOOLEAN"),
        Column("finish_reason", "VARCHAR"),
        Column("replica", "VARCHAR"),
        *_COMMON_TAIL,
        Column("_h", "UBIGINT", "md5_number_lower(request_id)"),
    ),
)

FEEDBACK = Table(
    "feedback",
    key="feedback_id",
    keep_latest=False,
    columns=(
        Column("feedback_id", "VARCHAR"),
        Column("request_id", "VARCHAR"),
        Column("choice_index", "INTEGER"),
        Column("ts", TS),
        Column("logged_at", TS),
        Column("kind", "VARCHAR"),
        Column("value", "JSON"),
        Column("value_num", "DOUBLE", "CASE WHEN kind IN ('thumbs', 'score') THEN try_cast(value AS DOUBLE) END"),
        Column(
            "value_text",
            "VARCHAR",
            "CASE WHEN kind IN ('label', 'correction', 'comment') THEN value ->> '$' END",
        ),
        Column("user", "VARCHAR"),
        Column("source", "VARCHAR"),
        Column("metadata", "JSON"),
        # What served the request, copied from the request event when the writer knew it
        # (NULL = not resolved yet; readers join those with `requests`).
        Column("alias", "VARCHAR"),
        Column("experiment_id", "VARCHAR"),
        Column("arm", "VARCHAR"),
        Column("adapter", "VARCHAR"),
        *_COMMON_TAIL,
        Column("_h", "UBIGINT", "md5_number_lower(feedback_id)"),
        Column("_rh", "UBIGINT", "md5_number_lower(request_id)"),
    ),
)

ASSIGNMENTS = Table(
    "assignments",
    key="event_id",
    keep_latest=False,
    columns=(
        Column("event_id", "VARCHAR"),
        Column("ts", TS),
        Column("logged_at", TS),
        Column("experiment_id", "VARCHAR"),
        Column("alias", "VARCHAR"),
        Column("arm", "VARCHAR"),
        Column("user", "VARCHAR"),
        Column("request_id", "VARCHAR"),
        *_COMMON_TAIL,
        Column("_h", "UBIGINT", "md5_number_lower(event_id)"),
    ),
)

ADAPTER_CHANGES = Table(
    "adapter_changes",
    key="event_id",
    keep_latest=False,
    columns=(
        Column("event_id", "VARCHAR"),
        Column("ts", TS),
        Column("logged_at", TS),
        Column("alias", "VARCHAR"),
        Column("adapter", "VARCHAR"),
        Column("previous", "VARCHAR"),
        Column("actor", "VARCHAR"),
        Column("reason", "VARCHAR"),
        *_COMMON_TAIL,
        Column("_h", "UBIGINT", "md5_number_lower(event_id)"),
    ),
)

TABLES: dict[str, Table] = {t.name: t for t in (REQUESTS, FEEDBACK, ASSIGNMENTS, ADAPTER_CHANGES)}

#: Fields a WAL line may carry (union over all tables) with their JSON reader types.
WAL_COLUMNS: dict[str, str] = {"_t": "VARCHAR", "text_logged": "BOOLEAN"}
for _table in TABLES.values():
    for _col in _table.columns:
        if _col.expr is None:
            WAL_COLUMNS.setdefault(_col.name, _col.type)
WAL_COLUMNS.update({"feedback_id": "VARCHAR", "event_id": "VARCHAR"})


def read_wal_sql(files: list[str]) -> str:
    """``read_json`` over WAL files, tolerant of a torn last line (such lines come back all-NULL)."""
    cols = "{" + ", ".join(f"{sql_str(k)}: {sql_str(v)}" for k, v in WAL_COLUMNS.items()) + "}"
    return (
        f"read_json({sql_list(files)}, format = 'newline_delimited', columns = {cols}, "
        "ignore_errors = true, filename = true, maximum_object_size = 268435456)"
    )
