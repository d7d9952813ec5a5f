"""Training-data export for the nightly retrain: supervised rows and preference pairs since a watermark.

* Supervised (``sft``): the prompt (chat ``messages`` or completions ``prompt``) with a preferred
  answer: answers whose latest rating is good (thumbs up, or score >= ``good_score``) and user
  corrections.
* Preference pairs (``pairs``): ``chosen`` vs ``rejected`` for the same prompt: a correction vs
  the original answer, and a good vs a bad answer (thumbs down or score <= ``bad_score``) to the
  same alias and prompt.

Answers are per choice: feedback with ``choice_index`` rates (or corrects) that choice of an ``n`` > 1
response, so two choices of one request rated good and bad make a pair. An answer is its text plus its tool
calls (``completion_tool_calls``; ``chosen_tool_calls`` / ``rejected_tool_calls`` in pairs: lists of
``{id, name, arguments}``), and a correction may be a corrected tool call. Every row keeps what the model was
offered and asked for (``tools``, ``tool_choice``, ``response_format``) so that training renders it with the
chat template's tools and the gate asks the same way.

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

# A logged choice as the export reads it; `choice` = the feedback's choice_index (0 when not given). Old rows and
# completions without a `choices` log fall back to `completion` for choice 0.
_CHOICE_TYPE = """'[{"index": "INTEGER", "text": "VARCHAR", "tool_calls": "JSON"}]'"""
_MACROS = f"""
CREATE OR REPLACE TEMP MACRO _choice(choices, choice) AS
    list_filter(from_json(choices, {_CHOICE_TYPE}), lambda c: c.index = choice)[1];
CREATE OR REPLACE TEMP MACRO _calls(tool_calls) AS
    CASE WHEN json_array_length(tool_calls) > 0 THEN tool_calls END;
-- what makes two answers the same: text and calls (name, arguments with JSON whitespace ignored)
CREATE OR REPLACE TEMP MACRO _answer_key(text, tool_calls) AS coalesce(text, '') || chr(0) || coalesce(CAST(
    list_transform(from_json(tool_calls, '[{{"name": "VARCHAR", "arguments": "VARCHAR"}}]'),
                   lambda c: c.name || '(' || coalesce(CAST(try(json(c.arguments)) AS VARCHAR), c.arguments) || ')')
    AS VARCHAR), '');
"""

_RATED = """
CREATE OR REPLACE TEMP TABLE _x_rated AS
WITH r AS (
    SELECT request_id, alias, adapter, arm, experiment_id, endpoint, messages, prompt, tools, tool_choice,
           response_format, completion, choices, logged_at,
           md5(alias || chr(0) || coalesce(CAST(messages AS VARCHAR), prompt)
               || coalesce(chr(0) || CAST(tools AS VARCHAR), '')) AS prompt_key
    FROM requests
    WHERE text_logged AND (completion IS NOT NULL OR choices IS NOT NULL)
      AND (messages IS NOT NULL OR prompt IS NOT NULL)
),
votes AS (
    SELECT request_id, coalesce(choice_index, 0) AS choice,
           arg_max(CASE WHEN kind = 'thumbs' THEN value_num
                        WHEN value_num >= $good THEN 1.0 WHEN value_num <= $bad THEN 0.0 END, ts) AS good,
           arg_max(feedback_id, ts) AS feedback_id, arg_max(metadata, ts) AS metadata,
           max(logged_at) AS fb_logged
    FROM feedback WHERE matched AND kind IN ('thumbs', 'score') AND source <> 'automatic'
    GROUP BY request_id, choice
),
labels AS (
    SELECT request_id, list(DISTINCT value_text ORDER BY value_text) AS labels, max(logged_at) AS label_logged
    FROM feedback WHERE matched AND kind = 'label' GROUP BY request_id
),
answered AS (
    SELECT r.* EXCLUDE (completion, choices), v.choice, v.good, v.feedback_id, v.metadata, v.fb_logged,
           _choice(r.choices, v.choice) AS ch,
           coalesce(struct_extract(ch, 'text'), CASE WHEN v.choice = 0 THEN r.completion END) AS completion,
           _calls(struct_extract(ch, 'tool_calls')) AS tool_calls
    FROM r JOIN votes v USING (request_id)
)
SELECT a.* EXCLUDE (ch, fb_logged), coalesce(l.labels, []) AS labels, _answer_key(completion, tool_calls) AS answer_key,
       greatest(a.logged_at, a.fb_logged, l.label_logged) AS available_at
FROM answered a LEFT JOIN labels l USING (request_id)
WHERE a.good IS NOT NULL AND (a.completion IS NOT NULL OR a.tool_calls IS NOT NULL)
"""

# A correction is the wanted text (value_text) or the wanted assistant message {content, tool_calls}
# (feedback.events.corrected_tool_calls); `original` is the choice it corrects.
_CORRECTIONS = """
CREATE OR REPLACE TEMP TABLE _x_corr AS
WITH c AS (
    SELECT r.request_id, r.alias, r.adapter, r.arm, r.experiment_id, r.endpoint, r.messages, r.prompt, r.tools,
           r.tool_choice, r.response_format, coalesce(f.choice_index, 0) AS choice, _choice(r.choices, choice) AS ch,
           coalesce(struct_extract(ch, 'text'), CASE WHEN choice = 0 THEN r.completion END) AS original,
           _calls(struct_extract(ch, 'tool_calls')) AS original_tool_calls,
           CASE WHEN json_type(f.value) = 'OBJECT' THEN coalesce(f.value ->> '$.content', '') ELSE f.value_text END
               AS correction,
           CASE WHEN json_type(f.value) = 'OBJECT' THEN f.value -> '$.tool_calls' END AS correction_tool_calls,
           f.feedback_id, f.metadata, greatest(r.logged_at, f.logged_at) AS available_at
    FROM feedback f JOIN requests r USING (request_id)
    WHERE f.matched AND f.kind = 'correction' AND f.value_text IS NOT NULL AND r.text_logged
      AND (r.messages IS NOT NULL OR r.prompt IS NOT NULL)
)
SELECT * EXCLUDE (ch) FROM c
"""

_SLICE = "alias, adapter, arm, experiment_id, endpoint"
_PROMPT = "messages, prompt, tools, tool_choice, response_format"

_SFT = f"""
SELECT md5('sft' || chr(0) || feedback_id) AS row_id, 'rated_good' AS origin, {_PROMPT},
       completion, tool_calls AS completion_tool_calls, choice AS choice_index, request_id, feedback_id, {_SLICE},
       labels, metadata, available_at
FROM _x_rated WHERE good = 1.0 AND available_at > $since AND available_at <= $until
  AND ($alias::VARCHAR IS NULL OR alias = $alias)
UNION ALL
SELECT md5('sft' || chr(0) || feedback_id), 'correction', {_PROMPT}, correction, correction_tool_calls, choice,
       request_id, feedback_id, {_SLICE}, [], metadata, available_at
FROM _x_corr WHERE available_at > $since AND available_at <= $until AND ($alias::VARCHAR IS NULL OR alias = $alias)
ORDER BY available_at, row_id
"""

_PAIRS = f"""
SELECT md5('pair' || chr(0) || feedback_id) AS row_id, 'correction' AS origin, {_PROMPT},
       correction AS chosen, original AS rejected, correction_tool_calls AS chosen_tool_calls,
       original_tool_calls AS rejected_tool_calls, request_id AS chosen_request_id,
       request_id AS rejected_request_id, {_SLICE}, metadata, available_at
FROM _x_corr
WHERE (original IS NOT NULL OR original_tool_calls IS NOT NULL)
  AND _answer_key(original, original_tool_calls) <> _answer_key(correction, correction_tool_calls)
  AND available_at > $since AND available_at <= $until AND ($alias::VARCHAR IS NULL OR alias = $alias)
UNION ALL
SELECT md5('pair' || chr(0) || g.request_id || chr(0) || b.request_id
           || CASE WHEN g.choice + b.choice > 0 THEN chr(0) || g.choice || chr(0) || b.choice ELSE '' END),
       'rating', g.messages, g.prompt, g.tools, g.tool_choice, g.response_format, g.completion, b.completion,
       g.tool_calls, b.tool_calls, g.request_id, b.request_id, g.alias, g.adapter, g.arm, g.experiment_id,
       g.endpoint, g.metadata, greatest(g.available_at, b.available_at) AS available_at
FROM _x_rated g JOIN _x_rated b ON g.prompt_key = b.prompt_key AND g.good = 1.0 AND b.good = 0.0
WHERE g.answer_key <> b.answer_key
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
    con.execute(_MACROS)
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
