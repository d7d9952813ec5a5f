"""Training-data export: supervised rows, preference pairs, slices, formats and the watermark."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq

from core.store_config import StoreConfig
from feedback.events import FeedbackEvent
from feedback.export import export_training_data, parse_watermark, read_rows
from feedback.store import EventStore
from tests.feedback.conftest import make_request

ASK = [{"role": "user", "content": "2+2?"}]


def _fb(rid: str, kind: str, value: object = None, **kw: object) -> FeedbackEvent:
    return FeedbackEvent(request_id=f"r{rid}", kind=kind, value=value, **kw)


def test_export_rows_pairs_slices_and_formats(tmp_path: Path):
    root = tmp_path / "events"
    with EventStore(StoreConfig(root=root), "gw") as s:
        s.submit(make_request("good", messages=ASK, completion="4", arm="lora", adapter="ad1", experiment_id="e1"))
        s.submit(make_request("bad", messages=ASK, completion="5", arm="control", experiment_id="e1"))
        s.submit(make_request("fix", completion="Paris is in Italy"))
        s.submit(make_request("score5", endpoint="completions", messages=None, prompt="Once", completion="upon"))
        s.submit(make_request("private", completion="secret"), log_text=False)
        s.write_feedback(_fb("good", "thumbs", True, metadata={"task": "math", "slice": "easy"}))
        s.write_feedback(_fb("good", "label", "arithmetic"))
        s.write_feedback(_fb("bad", "thumbs", True))
        s.write_feedback(_fb("bad", "thumbs", False))  # changed their mind: the latest vote counts
        s.write_feedback(_fb("fix", "correction", "Paris is in France"))
        s.write_feedback(_fb("score5", "score", 5))
        s.write_feedback(_fb("private", "thumbs", True))
        s.write_feedback(_fb("good", "thumbs", False, source="automatic"))  # automatic judges are ignored
    out = tmp_path / "export"
    result = export_training_data(root, out, lag_s=0)
    assert result.counts == {"sft": 3, "pairs": 2}
    sft = {r["request_id"]: r for r in read_rows(out / "sft.jsonl")}
    assert set(sft) == {"rgood", "rfix", "rscore5"}
    good = sft["rgood"]
    assert good["messages"] == ASK and good["completion"] == "4" and good["origin"] == "rated_good"
    assert (good["alias"], good["adapter"], good["arm"], good["experiment_id"]) == (
        "default",
        "ad1",
        "lora",
        "e1",
    )
    assert good["labels"] == ["arithmetic"] and good["metadata"] == {"task": "math", "slice": "easy"}
    assert sft["rfix"]["completion"] == "Paris is in France" and sft["rfix"]["origin"] == "correction"
    assert sft["rscore5"]["prompt"] == "Once" and sft["rscore5"]["messages"] is None
    pairs = {r["origin"]: r for r in read_rows(out / "pairs.jsonl")}
    assert (pairs["rating"]["chosen"], pairs["rating"]["rejected"]) == ("4", "5")
    assert (pairs["rating"]["chosen_request_id"], pairs["rating"]["rejected_request_id"]) == ("rgood", "rbad")
    assert (pairs["correction"]["chosen"], pairs["correction"]["rejected"]) == (
        "Paris is in France",
        "Paris is in Italy",
    )
    table = pq.read_table(out / "sft.parquet")
    assert table.num_rows == 3 and {"messages", "completion", "alias", "labels", "row_id"} <= set(table.column_names)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == result.counts and parse_watermark(str(out)) == result.watermark
    import datasets  # a dev dependency: without it this fails instead of skipping

    assert result.datasets is not None, "export_training_data returned no datasets although datasets imports"
    assert isinstance(result.datasets["sft"], datasets.Dataset) and result.datasets["sft"].num_rows == 3
    assert result.datasets["pairs"].num_rows == 2


def test_watermark_neither_skips_nor_repeats(tmp_path: Path):
    root = tmp_path / "events"
    with EventStore(StoreConfig(root=root), "gw") as s:
        s.submit(make_request(1))
        s.write_feedback(_fb("1", "thumbs", True))
        s.write_feedback(_fb("late", "thumbs", True))  # its request is logged only after the first export
        s.flush()
        first = export_training_data(root, tmp_path / "e1", lag_s=0)
        assert first.counts["sft"] == 1
        time.sleep(0.01)
        s.submit(make_request("late"))
        s.submit(make_request(2))
        s.write_feedback(_fb("2", "correction", "better answer"))
        s.flush()
        time.sleep(0.01)
        second = export_training_data(root, tmp_path / "e2", since=first.watermark, lag_s=0)
    ids = sorted(r["request_id"] for r in read_rows(tmp_path / "e2" / "sft.jsonl"))
    assert ids == ["r2", "rlate"]  # the pending feedback is exported once its request arrives
    assert second.watermark > first.watermark
    third = export_training_data(root, tmp_path / "e3", since=second.watermark, lag_s=0)
    assert third.counts == {"sft": 0, "pairs": 0}
    everything = export_training_data(root, tmp_path / "all", lag_s=0)
    assert everything.counts["sft"] == 3


def test_parse_watermark():
    assert parse_watermark(None) is None and parse_watermark("") is None
    assert parse_watermark("2025-01-02T03:04:05Z") == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_watermark("2025-01-02T03:04:05").tzinfo is not None  # type: ignore[union-attr]


TOOLS = [
    {"type": "function", "function": {"name": "lookup_order", "parameters": {"type": "object", "properties": {
        "order_id": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "escalate", "parameters": {"type": "object", "properties": {}}}},
]  # fmt: skip
WHERE = [{"role": "user", "content": "Where is my order A-7?"}]


def _choice(index: int, text: str | None, *calls: tuple[str, str]) -> dict[str, object]:
    tool_calls = [{"id": f"call_{index}_{k}", "name": n, "arguments": a} for k, (n, a) in enumerate(calls)]
    return {"index": index, "text": text, "finish_reason": "tool_calls" if calls else "stop", "tool_calls": tool_calls}


def test_export_keeps_tools_choices_and_corrected_tool_calls(tmp_path: Path):
    root = tmp_path / "events"
    with EventStore(StoreConfig(root=root), "gw") as s:
        # n=2: choice 0 escalates, choice 1 looks the order up; the user rates them apart
        s.submit(make_request("n2", messages=WHERE, tools=TOOLS, completion=None,
                              choices=[_choice(0, None, ("escalate", "{}")),
                                       _choice(1, None, ("lookup_order", '{"order_id": "a7"}'))]))  # fmt: skip
        s.write_feedback(_fb("n2", "thumbs", False, choice_index=0))
        s.write_feedback(_fb("n2", "thumbs", True, choice_index=1))
        # a wrong call corrected: the argument is written the way this app wants it
        s.submit(make_request("fix", messages=WHERE, tools=TOOLS, completion=None,
                              choices=[_choice(0, None, ("lookup_order", '{"order_id": "a7"}'))]))  # fmt: skip
        call = {"type": "function", "function": {"name": "lookup_order", "arguments": {"order_id": "A-7"}}}
        corrected = {"tool_calls": [call]}
        s.write_feedback(_fb("fix", "correction", corrected))
        # the same call re-typed with other whitespace is no pair
        s.submit(make_request("same", messages=WHERE, tools=TOOLS, completion=None,
                              choices=[_choice(0, None, ("lookup_order", '{"order_id":"A-7"}'))]))  # fmt: skip
        s.write_feedback(_fb("same", "correction", {"tool_calls": [{"function": {
            "name": "lookup_order", "arguments": '{"order_id": "A-7"}'}}]}))  # fmt: skip
    out = tmp_path / "export"
    result = export_training_data(root, out, lag_s=0)
    assert result.counts == {"sft": 3, "pairs": 2}
    sft = {(r["request_id"], r["origin"]): r for r in read_rows(out / "sft.jsonl")}
    good = sft[("rn2", "rated_good")]
    assert good["choice_index"] == 1 and good["tools"] == TOOLS and good["messages"] == WHERE
    assert [(c["name"], json.loads(c["arguments"])) for c in good["completion_tool_calls"]] == [
        ("lookup_order", {"order_id": "a7"})
    ]
    fix = sft[("rfix", "correction")]
    assert fix["completion"] == "" and fix["completion_tool_calls"] == [
        {"id": None, "name": "lookup_order", "arguments": '{"order_id":"A-7"}'}
    ]
    pairs = {r["origin"]: r for r in read_rows(out / "pairs.jsonl")}
    rating = pairs["rating"]  # two choices of one request
    assert rating["chosen_request_id"] == rating["rejected_request_id"] == "rn2"
    assert [c["name"] for c in rating["chosen_tool_calls"]] == ["lookup_order"]
    assert [c["name"] for c in rating["rejected_tool_calls"]] == ["escalate"]
    correction = pairs["correction"]
    assert correction["chosen_request_id"] == "rfix" and correction["tools"] == TOOLS
    assert json.loads(correction["chosen_tool_calls"][0]["arguments"]) == {"order_id": "A-7"}
    assert json.loads(correction["rejected_tool_calls"][0]["arguments"]) == {"order_id": "a7"}
