"""A store written in the v1 (prototype) layout is refused by readers and upgraded by a writer."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from core.store_config import StoreConfig
from feedback.migrations import STORE_FILE, StoreVersionError, ensure_current, read_version
from feedback.reader import StoreReader
from feedback.schema import SCHEMA_VERSION
from feedback.store import EventStore


def _write_v1_store(root: Path) -> None:
    """The prototype's layout: no STORE.json, no hash/logged_at/writer columns, VARCHAR feedback values."""
    old = root / "old-gw"
    old.mkdir(parents=True)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(f"""COPY (SELECT 'r' || i AS request_id, TIMESTAMPTZ '2024-05-01 10:00:00' + INTERVAL (i) MINUTE AS ts,
        'default' AS alias, 'chat' AS endpoint, 'exp-old' AS experiment_id,
        CASE WHEN i % 2 = 0 THEN 'control' ELSE 'lora' END AS arm, NULL::VARCHAR AS adapter, 'u' || i AS "user",
        '[{{"role":"user","content":"hi"}}]' AS messages, NULL::VARCHAR AS prompt, 'hello' AS completion,
        '{{}}' AS params, 3 AS prompt_tokens, 2 AS completion_tokens, 10.0 AS latency_ms, 200 AS status,
        NULL::VARCHAR AS error, false AS stream, 'old-gw' AS replica
        FROM range(10) t(i)) TO '{old}/requests-000000000001.parquet' (FORMAT parquet)""")
    con.execute(f"""COPY (SELECT 'f' || i AS feedback_id, 'r' || i AS request_id,
        TIMESTAMPTZ '2024-05-01 11:00:00' AS ts, 'thumbs' AS kind,
        CASE WHEN i < 3 THEN 'true' ELSE 'false' END AS value,
        NULL::VARCHAR AS "user", 'user' AS source, '{{"task": "qa"}}' AS metadata
        FROM range(5) t(i)) TO '{old}/feedback-000000000001.parquet' (FORMAT parquet)""")
    con.execute(f"""COPY (SELECT TIMESTAMPTZ '2024-05-01 10:00:00' AS ts, 'exp-old' AS experiment_id,
        'default' AS alias, 'control' AS arm, 'u' || i AS "user", 'r' || i AS request_id
        FROM range(4) t(i)) TO '{old}/assignments-000000000001.parquet' (FORMAT parquet)""")
    wal = [
        {
            "table": "requests",
            "request_id": "r-wal",
            "ts": "2024-05-02T00:00:00+00:00",
            "alias": "default",
            "endpoint": "chat",
            "latency_ms": 1.0,
            "status": 200,
            "replica": "old-gw",
            "completion": "x",
        },
        {
            "table": "feedback",
            "feedback_id": "f-wal",
            "request_id": "r-wal",
            "ts": "2024-05-02T00:01:00+00:00",
            "kind": "score",
            "value": 5,
            "source": "user",
            "metadata": {},
        },
    ]
    text = "".join(json.dumps(r) + "\n" for r in wal) + '{"table": "requests", "request_id": "torn'
    (old / "wal-000000000002.jsonl").write_text(text)


def test_v1_store_is_refused_by_readers_and_upgraded_by_a_writer(tmp_path: Path):
    _write_v1_store(tmp_path)
    assert read_version(tmp_path) == 1
    with pytest.raises(StoreVersionError, match="events migrate"):
        StoreReader(tmp_path).connect()

    with EventStore(StoreConfig(root=tmp_path), "new-gw"):
        pass
    assert json.loads((tmp_path / STORE_FILE).read_text())["schema_version"] == SCHEMA_VERSION
    con = StoreReader(tmp_path).connect()
    assert con.execute("SELECT count(*), count(_h), count(logged_at), min(writer) FROM requests").fetchone() == (
        11,
        11,
        11,
        "old-gw",
    )
    rows = con.execute(
        "SELECT feedback_id, value_num, arm, matched, metadata->>'task' FROM feedback ORDER BY feedback_id"
    ).fetchall()
    assert rows[0] == ("f-wal", 5.0, None, True, None)  # from the upgraded v1 WAL; its request too
    assert rows[1:4] == [
        ("f0", 1.0, "control", True, "qa"),
        ("f1", 1.0, "lora", True, "qa"),
        ("f2", 1.0, "control", True, "qa"),
    ]
    assert rows[4][1] == 0.0
    assert con.execute("SELECT count(DISTINCT event_id) FROM assignments").fetchone() == (4,)
    assert StoreReader(tmp_path).pending_feedback_count() == 0
    assert ensure_current(tmp_path) == SCHEMA_VERSION  # idempotent


def test_newer_store_is_refused(tmp_path: Path):
    (tmp_path / STORE_FILE).write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(StoreVersionError, match="upgrade loraloop"):
        StoreReader(tmp_path).connect()
    with pytest.raises(StoreVersionError):
        EventStore(StoreConfig(root=tmp_path), "gw").start()


def test_new_store_records_its_version(tmp_path: Path):
    assert read_version(tmp_path) is None
    assert StoreReader(tmp_path).counts() == {
        "requests": 0,
        "feedback": 0,
        "assignments": 0,
        "adapter_changes": 0,
    }
    with EventStore(StoreConfig(root=tmp_path), "gw"):
        pass
    assert read_version(tmp_path) == SCHEMA_VERSION


V3_COLUMNS = {"requests": ("choices", "tools", "tool_choice", "response_format"), "feedback": ("choice_index",)}


def _write_v2_store(root: Path) -> None:
    """A store as v2 wrote it: the current code's segments without the v3 columns, STORE.json saying 2."""
    from feedback.events import FeedbackEvent, RequestEvent

    with EventStore(StoreConfig(root=root), "v2-gw") as store:
        for i in range(3):
            store.submit(RequestEvent(request_id=f"r{i}", alias="a", endpoint="chat", latency_ms=1.0, status=200,
                                      replica="v2-gw", completion=f"answer {i}"))  # fmt: skip
        store.flush()
        store.write_feedback(FeedbackEvent(request_id="r1", kind="thumbs", value=True))
        store.seal()
    con = duckdb.connect()
    for seg in (root / "v2-gw").glob("*.parquet"):
        table = seg.name.rsplit("-", 1)[0]
        drop = ", ".join(f'"{c}"' for c in V3_COLUMNS.get(table, ()))
        if drop:
            con.execute(f"COPY (SELECT * EXCLUDE ({drop}) FROM read_parquet('{seg}')) TO '{seg}.v2' (FORMAT parquet)")
            Path(f"{seg}.v2").replace(seg)
    (root / STORE_FILE).write_text(json.dumps({"format": "loraloop-event-store", "schema_version": 2}))


def test_v2_store_gets_the_v3_columns(tmp_path: Path) -> None:
    _write_v2_store(tmp_path)
    assert read_version(tmp_path) == 2
    with pytest.raises(StoreVersionError, match="events migrate"):
        StoreReader(tmp_path).connect()
    assert ensure_current(tmp_path) == 2 and read_version(tmp_path) == SCHEMA_VERSION == 3
    con = StoreReader(tmp_path).connect()
    assert con.execute("SELECT request_id, completion, choices, tools FROM requests ORDER BY 1").fetchall() == [
        (f"r{i}", f"answer {i}", None, None) for i in range(3)
    ]
    assert con.execute("SELECT request_id, choice_index, value_num FROM feedback").fetchall() == [("r1", None, 1.0)]
    assert ensure_current(tmp_path) == SCHEMA_VERSION  # idempotent
