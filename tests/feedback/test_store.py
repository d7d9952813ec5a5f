"""Write/read round trips, idempotency, pending feedback, privacy, duplicates, queue policies, metrics."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from core.store_config import StoreConfig
from feedback.events import AdapterChangeEvent, AssignmentEvent, ChoiceLog, FeedbackEvent, ToolCallLog
from feedback.reader import StoreReader
from feedback.store import EventStore, StoreError
from tests.feedback.conftest import make_request, metric


def test_round_trip_through_wal_and_segments(store: EventStore, config: StoreConfig, registry: CollectorRegistry):
    ts = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    store.submit(make_request(1, ts=ts, experiment_id="e1", arm="lora", adapter="ad1", stream=True))
    store.submit(
        make_request(
            2,
            endpoint="completions",
            messages=None,
            prompt="once upon",
            status=500,
            error="backend down",
            completion=None,
        )
    )
    store.submit(AssignmentEvent(experiment_id="e1", alias="default", arm="lora", user="u1", request_id="r1"))
    store.submit(AdapterChangeEvent(alias="default", adapter="ad1", previous=None, actor="admin", reason="promote"))
    fb, created = store.write_feedback(
        FeedbackEvent(request_id="r1", kind="score", value=4, user="u1", metadata={"task": "qa", "slice": "math"})
    )
    assert created and fb.value == 4.0
    store.flush()

    def check() -> None:
        con = StoreReader(config.root).connect()
        rows = con.execute(
            'SELECT request_id, ts, endpoint, experiment_id, arm, adapter, "user", messages, prompt, completion, '
            "params, prompt_tokens, completion_tokens, latency_ms, ttft_ms, status, error, stream, finish_reason, "
            "replica, writer, text_logged FROM requests ORDER BY request_id"
        ).fetchall()
        assert len(rows) == 2
        r1 = rows[0]
        assert r1[0] == "r1" and r1[1] == ts and r1[3:7] == ("e1", "lora", "ad1", "u1")
        assert json.loads(r1[7]) == [{"role": "user", "content": "question 1"}]
        assert json.loads(r1[10]) == {"temperature": 0.7, "max_tokens": 32}
        assert r1[11:19] == (7, 3, 12.5, 4.0, 200, None, True, "stop")
        assert r1[19:] == ("gw-test", "gw-test", True)
        assert rows[1][2] == "completions" and rows[1][8] == "once upon" and rows[1][15:17] == (500, "backend down")
        f = con.execute(
            "SELECT feedback_id, kind, value_num, \"user\", metadata->>'slice', arm, adapter, matched FROM feedback"
        ).fetchall()
        assert f == [(fb.feedback_id, "score", 4.0, "u1", "math", "lora", "ad1", True)]
        assert con.execute('SELECT arm, "user", request_id FROM assignments').fetchall() == [("lora", "u1", "r1")]
        assert con.execute("SELECT adapter, actor FROM adapter_changes").fetchall() == [("ad1", "admin")]
        con.close()

    check()  # from the WAL tail
    store.seal()
    assert StoreReader(config.root).counts() == {
        "requests": 2,
        "feedback": 1,
        "assignments": 1,
        "adapter_changes": 1,
    }
    check()  # from Parquet segments
    wals = sorted(p.name for p in (config.root / "gw-test").glob("wal-*.jsonl"))
    assert wals == ["wal-000000000002.jsonl"]  # the sealed WAL is gone; its successor is open
    assert (config.root / "gw-test" / "requests-000000000001.parquet").is_file()
    assert metric(registry, "loraloop_events_written_total", {"table": "requests"}) == 2
    assert metric(registry, "loraloop_events_rejected_total", {"table": "requests"}) == 0


def test_feedback_is_idempotent_across_retries_and_restarts(config: StoreConfig, registry: CollectorRegistry):
    with EventStore(config, "gw-a", registry) as s:
        _, created = s.write_feedback(FeedbackEvent(feedback_id="fb-1", request_id="r1", kind="thumbs", value=True))
        again, created_again = s.write_feedback(
            FeedbackEvent(feedback_id="fb-1", request_id="r1", kind="thumbs", value=False)
        )
        assert created and not created_again
        assert again.value is True and again.feedback_id == "fb-1"
        assert metric(registry, "loraloop_feedback_duplicates_total") == 1
    with EventStore(config, "gw-a") as s:  # restarted replica still knows the id
        stored, created = s.write_feedback(FeedbackEvent(feedback_id="fb-1", request_id="r1", kind="thumbs", value=0))
        assert not created and stored.value is True
    with EventStore(config, "gw-b") as s:  # another replica: stored twice, deduplicated by readers
        assert s.write_feedback(FeedbackEvent(feedback_id="fb-1", request_id="r1", kind="thumbs", value=0))[1]
    con = StoreReader(config.root).connect()
    assert con.execute("SELECT count(*) FROM feedback_raw").fetchone() == (2,)
    assert con.execute("SELECT feedback_id, value_num, writer FROM feedback").fetchall() == [("fb-1", 1.0, "gw-a")]


def test_feedback_before_its_request_is_pending_then_reconciled(config: StoreConfig):
    with EventStore(config, "gw-a") as a, EventStore(config, "gw-b") as b:
        a.write_feedback(FeedbackEvent(feedback_id="early", request_id="r-late", kind="thumbs", value="up"))
        reader = StoreReader(config.root)
        assert reader.pending_feedback_count() == 1
        con = reader.connect()
        assert con.execute("SELECT matched, arm FROM feedback").fetchall() == [(False, None)]
        b.submit(make_request("-late", experiment_id="e1", arm="lora"))  # logged later, by another replica
        b.flush()
        assert reader.pending_feedback_count() == 0
        con = reader.connect()
        assert con.execute("SELECT matched, arm, experiment_id FROM feedback").fetchall() == [(True, "lora", "e1")]
        a.seal()  # sealing copies what served the request into the feedback segment
        con = StoreReader(config.root).connect()
        assert con.execute("SELECT arm FROM feedback_raw").fetchall() == [("lora",)]


def test_privacy_switch_never_stores_text(store: EventStore, config: StoreConfig):
    secret = "my-credit-card-4111-1111"
    store.submit(
        make_request(
            "p", messages=[{"role": "user", "content": secret}], completion=secret + "!",
            choices=[ChoiceLog(index=0, text=secret, tool_calls=[ToolCallLog(name="pay", arguments=secret)])],
            tools=[{"type": "function", "function": {"name": secret}}], tool_choice={"function": {"name": secret}},
            response_format={"type": "json_schema", "json_schema": {"name": secret}},
        ),
        log_text=False,
    )  # fmt: skip
    store.submit(make_request("q"))
    store.write_feedback(FeedbackEvent(request_id="rp", kind="correction", value=secret), log_text=False)
    store.flush()
    con = StoreReader(config.root).connect()
    rows = con.execute("SELECT request_id, messages, prompt, completion, text_logged FROM requests ORDER BY 1")
    assert rows.fetchall() == [
        ("rp", None, None, None, False),
        ("rq", '[{"role":"user","content":"question q"}]', None, "answer q", True),
    ]
    assert con.execute("SELECT value, kind FROM feedback").fetchall() == [(None, "correction")]
    assert con.execute("SELECT choices, tools, tool_choice, response_format FROM requests WHERE request_id = 'rp'"
                       ).fetchall() == [(None, None, None, None)]  # fmt: skip
    store.seal()
    for path in (config.root / "gw-test").iterdir():
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_duplicate_request_events_are_deduplicated_latest_wins(store: EventStore, config: StoreConfig):
    store.submit(make_request(1, latency_ms=1.0))
    store.seal()
    store.submit(make_request(1, latency_ms=2.0))  # at-least-once: the same request logged again
    store.submit(make_request(2))
    store.flush()
    con = StoreReader(config.root).connect()
    assert con.execute("SELECT count(*) FROM requests_raw").fetchone() == (3,)
    assert con.execute("SELECT request_id, latency_ms FROM requests ORDER BY 1").fetchall() == [
        ("r1", 2.0),
        ("r2", 12.5),
    ]


def test_full_queue_spills_to_the_wal_and_drops_nothing(tmp_path: Path, registry: CollectorRegistry):
    config = StoreConfig(root=tmp_path, queue_size=8, batch_size=8, flush_interval_s=5.0)
    with EventStore(config, "gw", registry) as s:
        for i in range(2000):
            s.submit(make_request(i))
        s.flush()
        assert metric(registry, "loraloop_event_wal_spills_total") > 0
        assert StoreReader(tmp_path).counts()["requests"] == 2000
    assert metric(registry, "loraloop_events_rejected_total", {"table": "requests"}) == 0


def test_block_policy_waits_for_room(tmp_path: Path, registry: CollectorRegistry):
    config = StoreConfig(
        root=tmp_path,
        queue_size=4,
        batch_size=2,
        flush_interval_s=0.001,
        full_queue_policy="block",
        block_timeout_s=5.0,
    )
    with EventStore(config, "gw", registry) as s:
        for i in range(500):
            s.submit(make_request(i))
    assert StoreReader(tmp_path).counts()["requests"] == 500
    assert metric(registry, "loraloop_events_rejected_total", {"table": "requests"}) == 0
    assert metric(registry, "loraloop_event_wal_spills_total") == 0


def test_metrics_live_on_the_given_registry_only(store: EventStore, registry: CollectorRegistry):
    store.submit(make_request(1, alias="chat", arm="b"))
    store.write_feedback(FeedbackEvent(request_id="r1", kind="thumbs", value=True))
    store.flush()
    names = {m.name for m in registry.collect()}
    assert names and all(n.startswith("loraloop_") for n in names)
    assert {
        "loraloop_feedback",
        "loraloop_event_queue_depth",
        "loraloop_event_flush_seconds",
        "loraloop_events_written",
        "loraloop_events_rejected",
        "loraloop_event_wal_spills",
    } <= names
    assert metric(registry, "loraloop_feedback_total", {"alias": "chat", "arm": "b", "kind": "thumbs"}) == 1
    assert metric(registry, "loraloop_event_queue_depth") == 0
    assert not any(m.name.startswith("loraloop_") for m in REGISTRY.collect())


def test_one_live_process_per_writer_id(store: EventStore, config: StoreConfig):
    with pytest.raises(StoreError, match="already running"):
        EventStore(config, "gw-test").start()
    with pytest.raises(ValueError):
        EventStore(config, "../escape")


def test_feedback_values_are_normalised():
    assert FeedbackEvent(request_id="r", kind="thumbs", value="down").value is False
    assert FeedbackEvent(request_id="r", kind="thumbs", value=1).value is True
    assert FeedbackEvent(request_id="r", kind="thumbs", value=-1).value is False
    assert FeedbackEvent(request_id="r", kind="score", value="3.5").value == 3.5
    assert FeedbackEvent(request_id="r", kind="copy").value is None
    with pytest.raises(ValueError):
        FeedbackEvent(request_id="r", kind="thumbs", value="maybe")
    with pytest.raises(ValueError):
        FeedbackEvent(request_id="r", kind="correction", value="")
    with pytest.raises(ValueError):
        FeedbackEvent(request_id="r", kind="score", value=True)


def test_submit_refuses_feedback_and_closed_store(store: EventStore):
    with pytest.raises(TypeError):
        store.submit(FeedbackEvent(request_id="r", kind="copy"))  # type: ignore[arg-type]
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError):
        store.submit(make_request(1))


def test_events_pydantic_cannot_serialise_are_kept(store: EventStore, config: StoreConfig, registry: CollectorRegistry):
    store.submit(make_request(1, params={"bad": object()}))  # not JSON-serialisable
    store.submit(make_request(2, completion="lone \ud800 surrogate"))
    store.submit(make_request(3))
    store.write_feedback(FeedbackEvent(request_id="r2", kind="correction", value="fix \udfff"))
    store.flush()
    con = StoreReader(config.root).connect()
    rows = con.execute("SELECT request_id, params->>'bad', completion FROM requests ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == ["r1", "r2", "r3"]
    assert rows[0][1].startswith("<object object") and rows[1][2] == "lone ? surrogate"
    assert con.execute("SELECT value_text FROM feedback").fetchall() == [("fix ?",)]
    assert metric(registry, "loraloop_events_rejected_total", {"table": "requests"}) == 0


def _abandon(s: EventStore) -> None:
    """Stop a store's threads without writing or sealing anything more, and release its directory."""
    assert s._writer is not None and s._sealer is not None and s._wal_fd is not None
    s._stopping = True
    s._wake.set()
    s._writer.join()
    s._seal_q.put(None)
    s._sealer.join()
    os.close(s._wal_fd)
    s._dir_lock.release()
    s._state = "closed"


def test_a_wal_that_cannot_be_sealed_does_not_prevent_start(config: StoreConfig, monkeypatch: pytest.MonkeyPatch):
    with EventStore(config, "gw") as s:
        s.submit(make_request(1))
        s.flush()
        _abandon(s)  # as if killed: the WAL stays, unsealed

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("feedback.store.seal_wal", disk_full)
    with EventStore(config, "gw") as s:  # starts anyway; the old WAL stays readable
        s.submit(make_request(2))
        s.flush()
        assert StoreReader(config.root).counts()["requests"] == 2
    monkeypatch.undo()
    with EventStore(config, "gw"):  # a later start seals it
        pass
    assert StoreReader(config.root).counts()["requests"] == 2
    assert not list((config.root / "gw").glob("wal-*"))


async def test_wait_durable_wakes_many_waiters_without_threads(config: StoreConfig, registry: CollectorRegistry):
    """The gateway's commit hook: every waiter returns once its events are on disk and readable, and
    no thread is parked per waiter (the writer thread wakes the event loop)."""
    import asyncio
    import threading

    slow = StoreConfig(root=config.root, flush_interval_s=0.3, batch_size=100, queue_size=10_000)
    with EventStore(slow, "gw-async", registry) as s:
        threads = threading.active_count()

        async def request(i: int) -> None:
            s.submit(make_request(i))
            await s.wait_durable()

        await asyncio.gather(*(request(i) for i in range(50)))
        assert threading.active_count() == threads
        con = StoreReader(config.root).connect()
        assert con.execute("SELECT count(*) FROM requests").fetchone() == (50,)
    await s.wait_durable()  # a closed store: nothing to wait for
