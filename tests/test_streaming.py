"""The stream pass-through helpers: recovering the text of a stream from its raw chunks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import Request
from starlette.middleware.gzip import GZipMiddleware

from core.serving_config import AliasConfig
from serving.app import GatewayApp
from serving.records import RequestRecord, Route, StreamPart, stream_parts
from serving.streaming import SERVER_SEND, ChunkRewriter, GuardedStreamingResponse, LastChunk


def texts(parts: list[StreamPart]) -> list[tuple[int, str | None, str | None]]:
    return [(p.index, p.text, p.finish_reason) for p in parts]


def test_stream_parts_of_chat_and_completion_chunks() -> None:
    chat = (
        b'[{"id":"x","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]},'
        b'{"id":"x","choices":[{"index":0,"delta":{"content":"Hel"},"logprobs":null,"finish_reason":null}]},'
        b'{"id":"x","choices":[{"index":1,"delta":{"content":"lo \\u00e9"},"finish_reason":"stop"}]},'
        b'{"id":"x","choices":[],"usage":{"prompt_tokens":3}}]'
    )
    assert texts(stream_parts(chat, chat=True)) == [(0, "", None), (0, "Hel", None), (1, "lo é", "stop")]
    completion = b'[{"choices":[{"index":0,"text":" a","finish_reason":null}]},{"choices":null}]'
    assert texts(stream_parts(completion, chat=False)) == [(0, " a", None)]


def test_stream_parts_of_unexpected_shapes_falls_back_to_plain_json() -> None:
    odd = b'[{"choices":[{"index":"0","delta":{"content":[{"type":"text"}]},"finish_reason":7}]},' \
        b'{"choices":[{"delta":{"content":"ok"}}]}]'  # fmt: skip
    assert texts(stream_parts(odd, chat=True)) == [(0, None, None), (0, "ok", None)]


# vLLM's shape of a streamed tool call: the id and name first, the arguments in fragments after
TOOL_STREAM = [
    b'{"choices":[{"index":0,"delta":{"role":"assistant","content":null},"finish_reason":null}]}',
    b'{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function",'
    b'"function":{"name":"lookup_order","arguments":""}}]},"finish_reason":null}]}',
    b'{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"order\\": "}}]}}]}',
    b'{"choices":[{"index":1,"delta":{"content":"Sure"},"finish_reason":"stop"}]}',
    b'{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\\"A-17\\"}"}},'
    b'{"index":1,"id":"call_2","function":{"name":"escalate","arguments":"{}"}}]},"finish_reason":"tool_calls"}]}',
]


def test_streamed_tool_calls_are_reassembled_per_choice() -> None:
    record = _record("agent")
    record.endpoint = "chat"
    record.stream_chunks = list(TOOL_STREAM)
    assert record.choice_logs() == [
        {"index": 0, "text": None, "finish_reason": "tool_calls", "tool_calls": [
            {"id": "call_1", "name": "lookup_order", "arguments": '{"order": "A-17"}'},
            {"id": "call_2", "name": "escalate", "arguments": "{}"}]},
        {"index": 1, "text": "Sure", "finish_reason": "stop", "tool_calls": []},
    ]  # fmt: skip
    assert record.finish_reason == "tool_calls"  # the request's own is choice 0's
    lenient = _record("agent")
    lenient.endpoint = "chat"
    lenient.stream_chunks = [*TOOL_STREAM, b'{"choices":[{"index":0,"delta":{"content":7}}]}']  # odd: plain JSON
    assert lenient.choice_logs() == record.choice_logs()


def _record(alias: str) -> RequestRecord:
    route = Route(alias, AliasConfig(), None, "base")
    return RequestRecord(request_id="cmpl-ours", endpoint="completions", route=route, body={}, user=None, stream=True)


def test_chunk_rewriter_splices_the_ids_from_the_first_chunk_on() -> None:
    record = _record('odd "alias"')
    rewrite = ChunkRewriter(record, client_wants_usage=False)
    head = b'{"id":"cmpl-vllm","object":"text_completion","created":17,"model":"base"'
    first = head + b',"choices":[{"index":0,"text":" a","logprobs":null,"finish_reason":null}]}'
    out = rewrite(first)
    assert out is not None and rewrite.prefix == head  # learnt from the bytes, no JSON round trip
    assert json.loads(out) == {**json.loads(first), "id": "cmpl-ours", "model": 'odd "alias"'}
    assert record.ttft_s is not None and record.stream_chunks == [first]
    usage = head + b',"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}'
    assert rewrite(usage) is None and record.completion_tokens == 1  # taken, not passed on unasked
    other = b'{"object":"x","id":"y","choices":[]}'  # another key order: parsed, not spliced
    assert (
        ChunkRewriter(_record("a"), client_wants_usage=True)(other)
        == b'{"object":"x","id":"cmpl-ours","choices":[],"model":"a"}'
    )


async def test_a_streamed_body_goes_through_the_servers_own_send() -> None:
    """The start passes the middleware's send (Starlette notes that the response started); the body
    goes through the server's send from the scope; the last chunk ends the response; on_close runs."""
    via_middleware: list[dict[str, Any]] = []
    via_server: list[dict[str, Any]] = []
    closed: list[bool] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield LastChunk(b"data: [DONE]\n\n")

    async def middleware_send(message: dict[str, Any]) -> None:
        via_middleware.append(message)

    async def server_send(message: dict[str, Any]) -> None:
        via_server.append(message)

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client never goes away
        return {"type": "http.disconnect"}

    response = GuardedStreamingResponse(body(), on_disconnect=lambda: None, on_close=lambda: closed.append(True))
    await response({"type": "http", SERVER_SEND: server_send}, receive, middleware_send)
    assert [m["type"] for m in via_middleware] == ["http.response.start"]
    assert [(m["body"], m["more_body"]) for m in via_server] == [
        (b"data: 1\n\n", True),
        (b"data: [DONE]\n\n", False),
    ]
    assert closed == [True]


async def test_the_gateway_app_hands_the_servers_send_to_its_routes() -> None:
    app = GatewayApp()
    seen: dict[str, Any] = {}

    @app.get("/probe")
    async def probe(request: Request) -> dict[str, str]:
        seen["send"] = request.scope.get(SERVER_SEND)
        return {}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as client:
        assert (await client.get("/probe")).status_code == 200
    assert callable(seen["send"])

    # a middleware added later may transform bodies: then they all go through it
    with_middleware = GatewayApp()
    with_middleware.add_middleware(GZipMiddleware)
    with_middleware.add_api_route("/probe", probe)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(with_middleware), base_url="http://gw") as client:
        assert (await client.get("/probe")).status_code == 200
    assert seen["send"] is None
