"""What the request log keeps of real application traffic (issue 16, part 1), through the live gateway and the
real vLLM into the real event store: every choice of `n`, `tools` / `tool_choice` / `response_format`, the tool
calls the model made (streamed deltas reassembled), media parts as references, feedback on one choice; and
`log_text: false` keeping all of it out."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from feedback.reader import StoreReader
from tests.conftest import LiveGateway

pytestmark = pytest.mark.integration

TOOLS = [{"type": "function", "function": {
    "name": "lookup_order", "description": "Find an order",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
}}]  # fmt: skip
# a named tool choice: vLLM constrains the arguments to the schema (structured outputs); the session's vLLM
# runs with a tool-call parser (tests/conftest.py, TOOL_CALLING), which vLLM requires for it
NAMED = {"type": "function", "function": {"name": "lookup_order"}}


def post(live: LiveGateway, body: dict[str, Any]) -> tuple[str, Any]:
    with live.client() as c:
        resp = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 24, **body})
    assert resp.status_code == 200, resp.text
    if body.get("stream"):
        return resp.headers["x-request-id"], resp.text
    return resp.json()["id"], resp.json()


def logged(live: LiveGateway, request_id: str) -> dict[str, Any]:
    live.app.state.store.flush()
    con = StoreReader(live.settings.store.root).connect()
    try:
        cur = con.execute(
            "SELECT messages, choices, tools, tool_choice, response_format, completion, finish_reason, text_logged "
            "FROM requests WHERE request_id = ?", [request_id])  # fmt: skip
        row = cur.fetchone()
        assert row is not None, f"{request_id} not logged"
        names = [d[0] for d in cur.description]
    finally:
        con.close()
    return {k: json.loads(v) if isinstance(v, str) and k not in ("completion", "finish_reason") else v
            for k, v in zip(names, row, strict=True)}  # fmt: skip


def test_every_choice_and_the_response_format_are_logged(live_gateway: LiveGateway) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": {
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}}  # fmt: skip
    rid, answer = post(live_gateway, {"messages": [{"role": "user", "content": "Is it ok?"}], "n": 3,
                                      "temperature": 1.0, "seed": 7, "response_format": fmt})  # fmt: skip
    row = logged(live_gateway, rid)
    sent = [(c["index"], c["message"]["content"], c["finish_reason"]) for c in answer["choices"]]
    assert [(c["index"], c["text"], c["finish_reason"]) for c in row["choices"]] == sent and len(sent) == 3
    assert row["completion"] == answer["choices"][0]["message"]["content"]
    assert row["response_format"] == fmt


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_are_logged_whole_streamed_or_not(live_gateway: LiveGateway, stream: bool) -> None:
    messages = [
        {"role": "user", "content": "Where is my order A-17?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_0", "type": "function",
                                                               "function": {"name": "lookup_order",
                                                                            "arguments": '{"order_id": "A-16"}'}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": '{"status": "shipped"}'},
        {"role": "user", "content": "And A-17?"},
    ]  # fmt: skip
    rid, answer = post(live_gateway, {"messages": messages, "tools": TOOLS, "tool_choice": NAMED, "stream": stream})
    if stream:  # what the client saw: the deltas, joined here the way a client joins them
        chunks = [json.loads(line[6:]) for line in answer.splitlines() if line.startswith("data: {")]
        deltas = [t for ch in chunks for c in ch.get("choices", []) for t in c["delta"].get("tool_calls") or []]
        seen = [{"name": deltas[0]["function"]["name"],
                 "arguments": "".join(t["function"].get("arguments") or "" for t in deltas)}]  # fmt: skip
        assert len(deltas) > 1  # streamed in pieces: the log had to reassemble them
    else:
        calls = answer["choices"][0]["message"]["tool_calls"]
        seen = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]
    row = logged(live_gateway, rid)
    got = [{"name": c["name"], "arguments": c["arguments"]} for c in row["choices"][0]["tool_calls"]]
    assert got == seen and got[0]["name"] == "lookup_order"
    assert '"order_id"' in got[0]["arguments"]  # constrained to the schema (may be cut by max_tokens)
    assert row["tools"] == TOOLS and row["tool_choice"] == NAMED
    assert row["messages"][1]["tool_calls"][0]["function"]["name"] == "lookup_order"
    assert row["messages"][2] == messages[2]  # the tool's answer, as sent


def test_a_corrected_tool_call_is_checked_stored_and_exported_with_the_tools(
    live_gateway: LiveGateway, tmp_path: Path
) -> None:
    from feedback.export import export_training_data, read_rows

    rid, answer = post(live_gateway, {"messages": [{"role": "user", "content": "Where is A-17?"}], "tools": TOOLS,
                                      "tool_choice": NAMED})  # fmt: skip
    made = answer["choices"][0]["message"]["tool_calls"][0]["function"]
    wanted = {"tool_calls": [{"type": "function", "function": {"name": "lookup_order",
                                                               "arguments": {"order_id": "A-17"}}}]}  # fmt: skip
    unknown = {"tool_calls": [{"type": "function", "function": {"name": "refund", "arguments": "{}"}}]}
    broken = {"tool_calls": [{"type": "function", "function": {"name": "lookup_order", "arguments": "{A-17"}}]}
    with live_gateway.client() as c:
        sent = [c.post("/v1/feedback", json={"request_id": rid, "kind": "correction", "value": v})
                for v in (unknown, broken, wanted)]  # fmt: skip
    assert [r.status_code for r in sent] == [400, 400, 201], [r.text for r in sent]
    assert sent[0].json()["error"]["message"] == (
        "the correction calls refund, which the request did not offer (its tools: lookup_order)"
    )
    assert sent[1].json()["error"]["message"] == "tool_calls[0].function.arguments is not valid JSON"
    live_gateway.app.state.store.flush()
    export_training_data(live_gateway.settings.store.root, tmp_path, lag_s=0, formats=("jsonl",), as_datasets=False)
    sft = [r for r in read_rows(tmp_path / "sft.jsonl") if r["request_id"] == rid]
    pairs = [r for r in read_rows(tmp_path / "pairs.jsonl") if r["chosen_request_id"] == rid]
    assert [(r["origin"], r["tools"]) for r in sft] == [("correction", TOOLS)]
    assert sft[0]["completion_tool_calls"] == [{"id": None, "name": "lookup_order", "arguments": '{"order_id":"A-17"}'}]
    if made["arguments"].replace(" ", "") != '{"order_id":"A-17"}':  # the tiny model rarely gets it right
        assert len(pairs) == 1 and pairs[0]["rejected_tool_calls"][0]["arguments"] == made["arguments"]


def test_media_parts_are_logged_as_references_and_feedback_can_target_a_choice(live_gateway: LiveGateway) -> None:
    audio = base64.b64encode(b"RIFF fake wav bytes").decode()
    image = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()
    content = [{"type": "text", "text": "What is in these?"}, {"type": "image_url", "image_url": {"url": image}},
               {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]  # fmt: skip
    # the tiny text-only model cannot take media: the request fails upstream, and is still logged
    with live_gateway.client() as c:
        resp = c.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": content}]}
        )
    assert resp.status_code == 400, resp.text
    rid = resp.headers["x-request-id"]
    row = logged(live_gateway, rid)
    parts = row["messages"][0]["content"]
    assert parts[0] == content[0]
    assert parts[1] == {
        "type": "image_url",
        "ref": {
            "type": "image_url",
            "source": "inline",
            "media_type": "image/png",
            "sha256": hashlib.sha256(b"\x89PNG fake").hexdigest(),
            "bytes": 9,
        },
    }
    assert parts[2]["ref"]["sha256"] == hashlib.sha256(b"RIFF fake wav bytes").hexdigest()
    assert audio not in json.dumps(row["messages"]) and image not in json.dumps(row["messages"])

    rid, _ = post(live_gateway, {"messages": [{"role": "user", "content": "Pick one"}], "n": 2, "max_tokens": 4})
    with live_gateway.client() as c:
        ok = c.post("/v1/feedback", json={"request_id": rid, "choice_index": 1, "kind": "thumbs", "value": True})
        beyond = c.post("/v1/feedback", json={"request_id": rid, "choice_index": 2, "kind": "thumbs", "value": True})
    assert ok.status_code == 201, ok.text
    assert beyond.status_code == 400 and beyond.json()["error"]["param"] == "choice_index", beyond.text
    live_gateway.app.state.store.flush()
    con = StoreReader(live_gateway.settings.store.root).connect()
    try:
        stored = con.execute("SELECT choice_index FROM feedback WHERE request_id = ?", [rid]).fetchall()
    finally:
        con.close()
    assert stored == [(1,)]  # the accepted one only


def test_log_text_false_keeps_all_of_it_out(live_gateway: LiveGateway) -> None:
    with live_gateway.client() as c:
        resp = c.post("/v1/chat/completions", json={
            "model": "private", "n": 2, "tools": TOOLS, "tool_choice": NAMED, "max_tokens": 8,
            "messages": [{"role": "user", "content": "secret order A-17"}]})  # fmt: skip
    assert resp.status_code == 200, resp.text
    row = logged(live_gateway, resp.json()["id"])
    assert row["text_logged"] is False
    assert [row[k] for k in ("messages", "choices", "tools", "tool_choice", "response_format", "completion")] == [
        None] * 6  # fmt: skip
