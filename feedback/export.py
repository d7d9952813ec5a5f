"""Training-data export for the nightly retrain: supervised rows and preference pairs since a watermark.

* Supervised (``sft``): the prompt (chat ``messages`` or completions ``prompt``) with a preferred
  answer: answers whose latest rating is good (thumbs up, or score >= ``good_score``) and user
  corrections.
* Preference pairs (``pairs``): ``chosen`` vs ``rejected`` for the same prompt: a correction vs
  the original answer, and a good vs a bad answer (thumbs down or score <= ``bad_score``) to the
  same alias and prompt.

Every row keeps its slice attributes (alias, adapter, arm, experiment_id, labels given as
``label`` feedback, the deciding feedback's metadata) and a stable ``row_id``.

Watermark: a row becomes *available* when the last event it is made of (request or feedback) was
logged (``logged_at``, stamped by the writer). An export covers availability times in
``(since, until]`` with ``until = now - export_lag_s`` and returns ``until`` as the new watermark,
so consecutive exports neither skip nor repeat rows, including feedback that arrived before its
request. Requests stored without text (privacy switch) yield no rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from feedback.reader import StoreReader
from feedback.schema import sql_str

_RATED = """
CREATE OR REPLACE TEMP TABLE _x_rated AS
WITH r AS (
    SELECT request_id, alias, adapter, arm, experiment_id, endpoint, messages, prompt, completion,
           logged_at, md5(alias || chr(0) || coalesce(CAST(messages AS VARCHAR), prompt)) AS prompt_key
    FROM requests
    WHERE text_logged AND completion IS NOT NULL AND (messages IS NOT NULL OR prompt IS NOT NULL)
),
votes AS (
    SELECT request_id,
           arg_max(CASE WHEN kind = 'thumbs' THEN value_num
                        WHEN value_num >= $good THEN 1.0 WHEN value_num <= $bad THEN 0.0 END, ts) AS good,
           arg_max(feedback_id, ts) AS feedback_id, arg_max(metadata, ts) AS metadata,
           max(logged_at) AS fb_logged
    FROM feedback WHERE matched AND kind IN ('thumbs', 'score') AND source <> 'automatic' GROUP BY request_id
),
labels AS (
    SELECT request_id, list(DISTINCT value_text ORDER BY value_text) AS labels, max(logged_at) AS label_logged
    FROM feedback WHERE matched AND kind = 'label' GROUP BY request_id
)
SELECT r.*, v.good, v.feedback_id, v.metadata, coalesce(l.labels, []) AS labels,
       greatest(r.logged_at, v.fb_logged, l.label_logged) AS available_at
FROM r JOIN votes v USING (request_id) LEFT JOIN labels l USING (request_id)
WHERE v.good IS NOT NULL
"""

_CORRECTIONS = """
CREATE OR REPLACE TEMP TABLE _x_corr AS
SELECT r.request_id, r.alias, r.adapter, r.arm, r.experiment_id, r.endpoint, r.messages, r.prompt,
       r.completion AS original, f.value_text AS correction, f.feedback_id, f.metadata,
       greatest(r.logged_at, f.logged_at) AS available_at
FROM feedback f JOIN requests r USING (request_id)
WHERE f.matched AND f.kind = 'correction' AND f.value_text IS NOT NULL AND r.text_logged
  AND (r.messages IS NOT NULL OR r.prompt IS NOT NULL)
"""

_SLICE = "alias, adapter, arm, experiment_id, endpoint"

_SFT = f"""
SELECT md5('sft' || chr(0) || feedback_id) AS row_id, 'rated_good' AS origin, messages, prompt,
       completion, request_id, feedback_id, {_SLICE}, labels, metadata, available_at
FROM _x_rated WHERE good = 1.0 AND available_at > $since AND available_at <= $until
  AND ($alias::VARCHAR IS NULL OR alias = $alias)
UNION ALL
SELECT md5('sft' || chr(0) || feedback_id), 'correction', messages, prompt, correction, request_id,
       feedback_id, {_SLICE}, [], metadata, available_at
FROM _x_corr WHERE available_at > $since AND available_at <= $until AND ($alias::VARCHAR IS NULL OR alias = $alias)
ORDER BY available_at, row_id
"""

_PAIRS = f"""
SELECT md5('pair' || chr(0) || feedback_id) AS row_id, 'correction' AS origin, messages, prompt,
       correction AS chosen, original AS rejected, request_id AS chosen_request_id,
       request_id AS rejected_request_id, {_SLICE}, metadata, available_at
FROM _x_corr
WHERE original IS NOT NULL AND original <> correction AND available_at > $since AND available_at <= $until
  AND ($alias::VARCHAR IS NULL OR alias = $alias)
UNION ALL
SELECT md5('pair' || chr(0) || g.request_id || chr(0) || b.request_id), 'rating', g.messages, g.prompt,
       g.completion, b.completion, g.request_id, b.request_id, g.alias, g.adapter, g.arm, g.experiment_id,
       g.endpoint, g.metadata, greatest(g.available_at, b.available_at) AS available_at
FROM _x_rated g JOIN _x_rated b ON g.prompt_key = b.prompt_key AND g.good = 1.0 AND b.good = 0.0
WHERE g.completion <> b.completion
  AND greatest(g.available_at, b.available_at) > $since AND greatest(g.available_at, b.available_at) <= $until
  AND ($alias::VARCHAR IS NULL OR g.alias = $alias)
ORDER BY available_at, row_id
"""


@dataclass
class ExportResult:
    """What an export wrote and the watermark to pass as ``since`` next time."""

    since: datetime | None
    watermark: datetime
    counts: dict[str, int]
    files: dict[str, Path]
    datasets: dict[str, Any] | None = field(default=None, repr=False)


def parse_watermark(value: str | None) -> datetime | None:
    """An ISO timestamp, a previous export's manifest.json (or its directory), or None for the start."""
    if value is None or value.strip().lower() in ("", "0", "none", "start"):
        return None
    path = Path(value)
    if path.is_dir():
        path = path / "manifest.json"
    if path.is_file():
        return datetime.fromisoformat(json.loads(path.read_text())["watermark"])
    ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _select_rows(con: Any, since: datetime | None, until: datetime, good: float, bad: float,
                 alias: str | None) -> dict[str, int]:  # fmt: skip
    """Fill the temp tables ``_x_sft`` and ``_x_pairs`` with the rows of the window; their counts."""
    con.execute(_RATED, {"good": float(good), "bad": float(bad)})
    con.execute(_CORRECTIONS)
    window = {"since": since or datetime(1970, 1, 1, tzinfo=UTC), "until": until, "alias": alias}
    counts: dict[str, int] = {}
    for name, sql in (("sft", _SFT), ("pairs", _PAIRS)):
        con.execute(f"CREATE OR REPLACE TEMP TABLE _x_{name} AS {sql}", window)
        row = con.execute(f"SELECT count(*) FROM _x_{name}").fetchone()
        counts[name] = int(row[0]) if row else 0
    return counts


def count_training_rows(
    root: Path | str,
    *,
    since: datetime | None = None,
    lag_s: float = 30.0,
    good_score: float = 4.0,
    bad_score: float = 2.0,
    alias: str | None = None,
) -> dict[str, int]:
    """How many ``sft`` rows and ``pairs`` an export with the same arguments would write now (nothing is
    written): the nightly cycle's measure of new training data, in the unit of the recipe's ``min_rows``."""
    con = StoreReader(root).connect()
    try:
        return _select_rows(con, since, datetime.now(UTC) - timedelta(seconds=lag_s), good_score, bad_score, alias)
    finally:
        con.close()


def export_training_data(
    root: Path | str,
    out_dir: Path | str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    lag_s: float = 30.0,
    good_score: float = 4.0,
    bad_score: float = 2.0,
    alias: str | None = None,
    formats: tuple[str, ...] = ("parquet", "jsonl"),
    as_datasets: bool = True,
) -> ExportResult:
    """Write ``sft`` and ``pairs`` (Parquet and JSONL) to ``out_dir`` with a ``manifest.json``; only the
    rows of requests to ``alias`` when it is given.

    ``datasets`` holds ``datasets.Dataset`` objects when the package is importable (and
    ``as_datasets``). See the module docs for the row definitions and the watermark.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    until = until or datetime.now(UTC) - timedelta(seconds=lag_s)
    con = StoreReader(root).connect()
    try:
        counts = _select_rows(con, since, until, good_score, bad_score, alias)
        files: dict[str, Path] = {}
        tables: dict[str, Any] = {}
        for name in ("sft", "pairs"):
            for fmt in formats:
                path = out / f"{name}.{fmt}"
                option = "FORMAT parquet, COMPRESSION zstd" if fmt == "parquet" else "FORMAT json"
                con.execute(f"COPY _x_{name} TO {sql_str(str(path))} ({option})")
                files[f"{name}.{fmt}"] = path
            if as_datasets:
                tables[name] = con.sql(f"SELECT * FROM _x_{name}").to_arrow_table()
    finally:
        con.close()
    manifest = {
        "since": since.isoformat() if since else None,
        "watermark": until.isoformat(),
        "alias": alias,
        "counts": counts,
        "files": {k: p.name for k, p in files.items()},
        "good_score": good_score,
        "bad_score": bad_score,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return ExportResult(since, until, counts, files, _to_datasets(tables) if as_datasets else None)


def _to_datasets(tables: dict[str, Any]) -> dict[str, Any] | None:
    try:
        import datasets
    except ImportError:
        return None
    return {name: datasets.Dataset(table) for name, table in tables.items()}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of an exported JSONL file (tests, inspection)."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


__all__ = ["ExportResult", "export_training_data", "parse_watermark", "read_rows"]
