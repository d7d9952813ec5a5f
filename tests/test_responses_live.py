"""POST /v1/responses through the session's gateway and vLLM, with the official `openai` client in strict mode:
the alias's adapter serves it, the answer (streamed and not) carries the gateway's id and the alias, the request is
logged in chat's shape (tools and the function call included) and takes feedback; and what needs stored state is a
400 that names it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from feedback.export import export_training_data, read_rows
from feedback.reader import StoreReader
from tests.conftest import API_KEY, LiveGateway

pytestmark = pytest.mark.integration

TOOL = {"type": "function", "name": "lookup_order", "description": "Find an order", "strict": True,
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string", "enum": ["A-16", "A-17"]}},
                       "required": ["order_id"], "additionalProperties": False}}  # fmt: skip
HISTORY: list[Any] = [
    {"role": "user", "content": "Where is A-16?"},
    {"type": "function_call", "call_id": "call_1", "name": "lookup_order", "arguments": '{"order_id": "A-16"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": '{"status": "shipped"}'},
    {"role": "user", "content": [{"type": "input_text", "text": "And A-17?"}]},
]


@pytest.fixture(scope="module")
def client(live_gateway: LiveGateway) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{live_gateway.url}/v1", api_key=API_KEY, max_retries=0, _strict_response_validation=True
    )


def logged(live: LiveGateway, request_id: str) -> dict[str, Any]:
    live.app.state.store.flush()
    con = StoreReader(live.settings.store.root).connect()
    try:
        cur = con.execute("SELECT endpoint, adapter, messages, choices, tools, tool_choice, completion, finish_reason, "
                          "status, stream, prompt_tokens FROM requests WHERE request_id = ?", [request_id])  # fmt: skip
        row = cur.fetchone()
        assert row is not None, f"{request_id} not logged"
        names = [d[0] for d in cur.description]
    finally:
        con.close()
    decoded = ("messages", "choices", "tools", "tool_choice")
    return {k: json.loads(v) if k in decoded and v is not None else v for k, v in zip(names, row, strict=True)}


def test_responses_answer_through_the_alias_and_are_logged_with_feedback(
    client: openai.OpenAI, live_gateway: LiveGateway, tmp_path: Path
) -> None:
    raw = client.responses.with_raw_response.create(
        model="labeler", instructions="Answer with a label.", input="Is this about billing?"
    )
    answer = raw.parse()
    assert answer.id.startswith("resp_") and answer.id == raw.headers["x-request-id"]
    assert answer.model == "labeler" and raw.headers["x-loraloop-adapter"] == "alpha"
    assert answer.status in ("completed", "incomplete") and answer.output_text.startswith("alpha")
    assert answer.instructions == "Answer with a label."  # the client's own, as sent
    row = logged(live_gateway, answer.id)
    assert (row["endpoint"], row["adapter"], row["status"], row["stream"]) == ("responses", "alpha", 200, False)
    assert row["messages"] == [{"role": "system", "content": "Answer with a label."},
                               {"role": "user", "content": "Is this about billing?"}]  # fmt: skip
    assert row["completion"] == answer.output_text and row["prompt_tokens"] == answer.usage.input_tokens  # type: ignore[union-attr]
    with live_gateway.client() as c:
        fb = c.post("/v1/feedback", json={"request_id": answer.id, "kind": "thumbs", "value": True})
    assert fb.status_code == 201, fb.text
    assert fb.json()["request_id"] == answer.id
    # and it is training data like a chat answer: the thumbs up makes it an SFT row of the export
    live_gateway.app.state.store.flush()
    export_training_data(live_gateway.settings.store.root, tmp_path, lag_s=0, formats=("jsonl",), as_datasets=False)
    rows = [r for r in read_rows(tmp_path / "sft.jsonl") if r["request_id"] == answer.id]
    assert [(r["endpoint"], r["origin"], r["completion"]) for r in rows] == [
        ("responses", "rated_good", answer.output_text)
    ]


def test_a_streamed_function_call_is_logged_in_chat_shape(client: openai.OpenAI, live_gateway: LiveGateway) -> None:
    events = list(client.responses.create(
        model="tiny", input=HISTORY, tools=[TOOL], tool_choice={"type": "function", "name": "lookup_order"},  # type: ignore[list-item]
        max_output_tokens=48, temperature=0, stream=True,
    ))  # fmt: skip
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    final = events[-1].response  # type: ignore[union-attr]
    assert {e.response.id for e in events if hasattr(e, "response")} == {final.id}  # type: ignore[union-attr]
    assert final.model == "tiny" and final.id.startswith("resp_")
    call = next(item for item in final.output if item.type == "function_call")
    assert call.name == "lookup_order" and json.loads(call.arguments)["order_id"] in ("A-16", "A-17")
    row = logged(live_gateway, final.id)
    assert (row["endpoint"], row["stream"], row["finish_reason"]) == ("responses", True, "tool_calls")
    assert row["choices"][0]["tool_calls"] == [
        {"id": call.call_id, "name": "lookup_order", "arguments": call.arguments}
    ]
    assert row["tools"] == [{"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}]
    assert row["tool_choice"] == {"type": "function", "function": {"name": "lookup_order"}}
    assert row["messages"] == [
        {"role": "user", "content": "Where is A-16?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "lookup_order", "arguments": '{"order_id": "A-16"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'},
        {"role": "user", "content": "And A-17?"},
    ]  # fmt: skip


def test_what_needs_stored_state_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="tiny", input="Hi", previous_response_id="resp_0123")
    assert caught.value.code == "unsupported_parameter" and caught.value.param == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.retrieve("resp_0123")
    assert caught.value.code == "unsupported_endpoint"
