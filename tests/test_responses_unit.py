"""POST /v1/responses without a model: what needs stored state and malformed tools are OpenAI-shaped 400s before
any back-end sees them; the alias template on `input`; the chat-shaped log view; and vLLM 0.32's own bytes (recorded
in tests/data/responses) replayed through the gateway, streamed and not, into the request log."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from core.serving_config import AliasConfig
from core.settings import Settings
from feedback.reader import StoreReader
from serving.app import build_app
from serving.records import RequestRecord, Route
from serving.responses import ResponseEventRewriter, apply_responses_template, take_response
from serving.responses_log import chat_view
from tests.fake_vllm import serve_in_thread
from tests.test_gateway_unit import AUTH, Gateway, assert_openai_error, gw

__all__ = ["gw"]  # the in-process gateway in front of the fake vLLM (tests/test_gateway_unit.py)

DATA = Path(__file__).resolve().parent / "data" / "responses"
STREAM = (DATA / "vllm-0.32-stream.sse").read_bytes()  # `input: "Hello there"`, 4 tokens: cut at max_output_tokens
CALL = json.loads((DATA / "vllm-0.32-function-call.json").read_text())  # a named tool choice, cut at 40 tokens
TOOL = {"type": "function", "name": "lookup_order", "parameters": {"type": "object", "properties": {}}}


# ------------------------------------------------------------------------------------------------ the 400s


#: (what the request adds, the `param` its 400 names, its `code`)
REFUSED: list[tuple[dict[str, Any], str, str]] = [
    ({"previous_response_id": "resp_123"}, "previous_response_id", "unsupported_parameter"),
    ({"store": True}, "store", "unsupported_parameter"),
    ({"background": True}, "background", "unsupported_parameter"),
    ({"conversation": "conv_1"}, "conversation", "unsupported_parameter"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "unsupported_parameter"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0", "unsupported_parameter"),
    ({"input": []}, "input", "invalid_value"),
    ({"tools": [{"type": "function", "parameters": {"type": "object"}}]}, "tools.0.name", "invalid_value"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type", "invalid_value"),
    ({"tools": [{**TOOL, "parameters": {"type": "string"}}]}, "tools.0.parameters", "invalid_value"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "cancel"}}, "tool_choice", "invalid_value"),
    ({"tools": [TOOL] * 129}, "tools", "invalid_value"),
]


async def test_what_cannot_be_served_is_a_400_before_vllm(gw: Gateway) -> None:
    for extra, param, code in REFUSED:  # one gateway for all of them: each costs a request, not a start
        resp = await gw.client.post("/v1/responses", json={"model": "plain", "input": "Hi", **extra})
        err = assert_openai_error(resp, 400, param)
        assert (err["code"], err["type"]) == (code, "invalid_request_error"), (extra, err)
    assert gw.fake.state.received == []  # refused before any back-end saw them


async def test_stored_responses_cannot_be_read_back(gw: Gateway) -> None:
    stored = "/v1/responses/resp_1"
    for method, path in (("GET", stored), ("DELETE", stored), ("POST", f"{stored}/cancel"),
                         ("GET", f"{stored}/input_items")):  # fmt: skip
        err = assert_openai_error(await gw.client.request(method, path), 400, "response_id")
        assert err["code"] == "unsupported_endpoint" and "not stored" in err["message"]
    assert (await gw.client.get("/v1/responses/resp_1", headers={"Authorization": "Bearer nope"})).status_code == 401


# ---------------------------------------------------------------------------------------- pure functions


def test_the_alias_template_goes_into_input_not_instructions() -> None:
    config = AliasConfig(system_prompt="You are support.", few_shot=[{"user": "hi", "assistant": "hello"}],
                         defaults={"temperature": 0.2, "max_tokens": 9})  # fmt: skip
    body: dict[str, Any] = {"input": "My invoice"}
    apply_responses_template(body, config)
    assert body == {"input": [{"role": "system", "content": "You are support."}, {"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "My invoice"}],
                    "temperature": 0.2, "max_output_tokens": 9}  # fmt: skip
    own = {"instructions": "Mine.", "input": [{"role": "user", "content": "x"}], "max_output_tokens": 3}
    apply_responses_template(own, config)  # the request's own instructions win; its own length too
    assert own["input"][0] == {"role": "user", "content": "hi"} and own["max_output_tokens"] == 3
    lead = {"input": [{"type": "message", "role": "developer", "content": "Dev."}, {"role": "user", "content": "x"}]}
    apply_responses_template(lead, config)
    assert [m["content"] for m in lead["input"]] == ["Dev.", "hi", "hello", "x"]


def test_the_log_keeps_a_responses_request_in_chat_shape() -> None:
    body = {
        "instructions": "Route orders.", "max_output_tokens": 16, "temperature": 0.5, "tool_choice": "required",
        "tools": [{**TOOL, "description": "Find"}], "text": {"format": {"type": "json_schema", "name": "v",
                                                                         "schema": {"type": "object"}}},
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Where "},
                                         {"type": "input_text", "text": "?"}]},
            {"type": "function_call", "call_id": "c1", "name": "lookup_order", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "lookup_order", "arguments": '{"a": 1}'},
            {"type": "function_call_output", "call_id": "c1", "output": {"status": "shipped"}},
            {"type": "reasoning", "summary": []},
            {"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,iVBO"}]},
        ],
    }  # fmt: skip
    view = chat_view(body)
    calls = [{"id": c, "type": "function", "function": {"name": "lookup_order", "arguments": a}}
             for c, a in (("c1", "{}"), ("c2", '{"a": 1}'))]  # fmt: skip
    assert view["messages"] == [
        {"role": "system", "content": "Route orders."},
        {"role": "user", "content": "Where ?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": '{"status": "shipped"}'},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]},
    ]
    assert view["tools"] == [{"type": "function", "function": {"name": "lookup_order", "description": "Find",
                                                               "parameters": TOOL["parameters"]}}]  # fmt: skip
    assert view["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "v", "schema": {"type": "object"}},
    }
    assert (view["tool_choice"], view["max_tokens"], view["temperature"]) == ("required", 16, 0.5)
    assert chat_view({"input": "Hi", "tool_choice": {"type": "function", "name": "f"}}) == {
        "messages": [{"role": "user", "content": "Hi"}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
    }


def record(endpoint: Any = "responses") -> RequestRecord:
    route = Route("labels", AliasConfig(), "alpha", "alpha")
    return RequestRecord("resp_gateway01", endpoint, route, {"input": "Hi", "instructions": "Be brief."}, None, True)


def test_a_function_call_response_becomes_choice_zero() -> None:
    rec = record()
    take_response(rec, CALL)
    call = CALL["output"][0]
    assert rec.choice_logs() == [{"index": 0, "text": None, "finish_reason": "length",
                                  "tool_calls": [{"id": call["call_id"], "name": "lookup_order",
                                                  "arguments": call["arguments"]}]}]  # fmt: skip
    assert (rec.prompt_tokens, rec.completion_tokens) == (19, 40)
    assert rec.logged_body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    done = record()
    take_response(done, {**CALL, "status": "completed", "incomplete_details": None})
    assert done.finish_reason == "tool_calls"


def events(raw: bytes) -> list[bytes]:
    return [e.split(b"data: ", 1)[1] for e in raw.split(b"\n\n") if e.strip()]


def test_stream_events_get_the_alias_and_keep_their_bytes() -> None:
    rec = record()
    rewrite = ResponseEventRewriter(rec)
    upstream = events(STREAM)
    frames = [rewrite(e) for e in upstream]
    kinds = [json.loads(e)["type"] for e in upstream]
    for kind, event, frame in zip(kinds, upstream, frames, strict=True):
        assert frame is not None and frame.startswith(f"event: {kind}\ndata: ".encode())
        data = json.loads(frame.split(b"data: ", 1)[1])
        if "response" in data:
            assert (data["response"]["id"], data["response"]["model"]) == ("resp_gateway01", "labels")
        else:
            assert frame.endswith(event)  # passed on as vLLM's bytes
    assert rec.completion_text == "53 46amer" and rec.finish_reason == "length" and rec.completion_tokens == 4
    assert rec.ttft_s is not None and rewrite.failure is None
    cut = record()  # the client left after two deltas: what was sent is still logged
    cut_rewrite = ResponseEventRewriter(cut)
    for event in upstream[:6]:
        cut_rewrite(event)
    assert cut.completion_text == "53 " and cut.finish_reason is None


def test_an_error_event_marks_the_stream_failed() -> None:
    rewrite = ResponseEventRewriter(record())
    frame = rewrite(b'{"code":"server_error","message":"engine died","param":null,"sequence_number":3,"type":"error"}')
    assert (
        frame is not None
        and frame.startswith(b"event: error\n")
        and rewrite.failure == "the response failed: engine died"
    )


# ------------------------------------------------------------------------------ vLLM's bytes, replayed


def replay_vllm() -> FastAPI:
    """vLLM's /v1/responses as recorded: the stream or the function-call answer, whatever was asked."""
    app = FastAPI()
    app.state.received = []

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        body = await request.json()
        app.state.received.append(body)
        if body.get("stream"):
            return Response(STREAM, media_type="text/event-stream")
        return JSONResponse({**CALL, "id": body["request_id"], "model": body["model"]})

    return app


@pytest.fixture(scope="module")
def replayed() -> Iterator[tuple[FastAPI, str]]:
    app = replay_vllm()
    with serve_in_thread(app) as url:
        yield app, url


@pytest.fixture
async def replay_gateway(replayed: tuple[FastAPI, str], tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(model="tiny", api_key=AUTH["Authorization"].split()[1], replica_id="replay",
                        backends={"mode": "remote", "urls": [replayed[1]]},
                        store={"root": str(tmp_path / "events"), "flush_interval_s": 0.01},
                        aliases={"labels": {"system_prompt": "Label it.", "defaults": {"max_tokens": 4}}})  # fmt: skip
    app = build_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.pool.check_all()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway",
                                     headers=AUTH) as client:  # fmt: skip
            client.app = app  # type: ignore[attr-defined]
            yield client


def logged(app: Any, request_id: str) -> dict[str, Any]:
    app.state.store.flush()
    con = StoreReader(app.state.settings.store.root).connect()
    try:
        cur = con.execute("SELECT endpoint, messages, completion, finish_reason, status, stream, completion_tokens "
                          "FROM requests WHERE request_id = ?", [request_id])  # fmt: skip
        row = cur.fetchone()
        names = [d[0] for d in cur.description]
    finally:
        con.close()
    assert row is not None, request_id
    return dict(zip(names, row, strict=True))


async def test_replayed_answers_are_passed_on_and_logged(
    replay_gateway: httpx.AsyncClient, replayed: tuple[FastAPI, str]
) -> None:
    app, fake = replay_gateway.app, replayed[0]  # type: ignore[attr-defined]
    resp = await replay_gateway.post("/v1/responses", json={"model": "labels", "input": "Hi", "store": False})
    assert resp.status_code == 200, resp.text
    answer, sent = resp.json(), fake.state.received[-1]
    assert answer["id"] == resp.headers["x-request-id"] == sent["request_id"] and answer["model"] == "labels"
    assert (sent["model"], sent["store"], sent["max_output_tokens"]) == ("base", False, 4)
    assert sent["input"] == [{"role": "system", "content": "Label it."}, {"role": "user", "content": "Hi"}]
    row = logged(app, answer["id"])
    assert (row["endpoint"], row["finish_reason"], row["status"], row["stream"]) == ("responses", "length", 200, False)
    assert json.loads(row["messages"])[0] == {"role": "system", "content": "Label it."}

    resp = await replay_gateway.post("/v1/responses", json={"model": "labels", "input": "Hi", "stream": True})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in resp.text.split("\n\n") if f]
    assert all(f.startswith("event: response.") for f in frames) and len(frames) == len(events(STREAM))
    last = json.loads(frames[-1].split("data: ", 1)[1])
    assert last["type"] == "response.completed" and last["response"]["model"] == "labels"
    assert last["response"]["id"] == resp.headers["x-request-id"]
    row = logged(app, resp.headers["x-request-id"])
    assert (row["completion"], row["finish_reason"], row["stream"], row["completion_tokens"]) == (
        "53 46amer", "length", True, 4)  # fmt: skip
