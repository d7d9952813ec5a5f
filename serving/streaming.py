"""Passing vLLM's token streams on: the chunk rewriter (loraloop's id and the alias spliced into vLLM's
bytes), the schema fix-ups, and the streaming response that notices a client leaving."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from .records import RequestRecord

#: Optional fields that vLLM sends as null but OpenAI's schema types as array/object: dropped.
_NULL_DROPPED = ("annotations", "audio", "function_call", "tool_calls", "prompt_tokens_details",
                 "completion_tokens_details", "service_tier", "system_fingerprint")  # fmt: skip


def drop_spec_nulls(obj: dict[str, Any]) -> dict[str, Any]:
    """Remove null optional fields from a response or chunk, in place (top level, usage, choices
    and their message/delta), so responses match the OpenAI schema exactly."""
    parts: list[dict[str, Any]] = [obj]
    if isinstance(obj.get("usage"), dict):
        parts.append(obj["usage"])
    for choice in obj.get("choices") or []:
        parts.append(choice)
        for key in ("message", "delta"):
            if isinstance(choice.get(key), dict):
                parts.append(choice[key])
    for part in parts:
        for key in _NULL_DROPPED:
            if key in part and part[key] is None:
                del part[key]
    return obj


def error_status(payload: bytes) -> int:
    try:
        code = json.loads(payload)["error"].get("code")
    except (ValueError, KeyError, AttributeError):
        return 502
    return code if isinstance(code, int) and 400 <= code < 600 else 502


def take_usage(record: RequestRecord, usage: dict[str, Any] | None) -> None:
    if usage:
        record.prompt_tokens = usage.get("prompt_tokens")
        record.completion_tokens = usage.get("completion_tokens")


class ChunkRewriter:
    """Puts loraloop's id and the alias into vLLM's stream chunks, as bytes.

    vLLM serialises every chunk of a stream with the same prefix (`{"id":..,"object":..,"created":..,
    "model":..`), so the common case is a byte splice; a chunk is parsed only when it carries usage or
    nulls the OpenAI schema does not allow. The text is recovered from the raw chunks after the stream.
    """

    #: chunks that need parsing: usage, or nulls the OpenAI schema does not allow (one C-level scan)
    _SLOW = re.compile(rb'"(?:usage":\{|tool_calls":null|function_call":null|annotations":null)')
    #: vLLM's constant chunk head, as it serialises it (compact JSON, these keys in this order)
    _HEAD = re.compile(
        rb'\{"id":("(?:[^"\\]|\\.)*"),"object":("(?:[^"\\]|\\.)*"),"created":(\d+),"model":("(?:[^"\\]|\\.)*")'
    )

    #: what goes before each chunk in the client's stream
    frame_prefix = b"data: "
    #: chat and completions streams report errors in the stream itself, not here (ResponseEventRewriter does)
    failure: str | None = None

    def __init__(self, record: RequestRecord, client_wants_usage: bool) -> None:
        self.record = record
        self.client_wants_usage = client_wants_usage
        self.prefix: bytes | None = None
        self.replacement = b""
        self.content_marker = b'"text":"' if record.endpoint == "completions" else b'"delta":{"content":"'

    def __call__(self, payload: bytes) -> bytes | None:
        record = self.record
        if record.ttft_s is None and self.content_marker in payload:
            record.ttft_s = time.perf_counter() - record.started
        if self.prefix is None:
            self._learn_prefix(payload)
        prefix = self.prefix
        if prefix is not None and payload.startswith(prefix) and self._SLOW.search(payload) is None:
            record.stream_chunks.append(payload)
            return self.replacement + payload[len(prefix) :]
        return self._slow(payload)

    def _learn_prefix(self, payload: bytes) -> None:
        """Take the splice point from the first chunk's bytes (no JSON round trip on the hot path)."""
        head = self._HEAD.match(payload)
        if head is None:
            return  # another shape: the chunks are parsed (and the prefix learnt there, if it exists)
        record = self.record
        self.prefix = head.group(0)
        self.replacement = b'{"id":%s,"object":%s,"created":%s,"model":%s' % (
            json.dumps(record.request_id).encode(),
            head.group(2),
            head.group(3),
            json.dumps(record.route.alias).encode(),
        )

    def _slow(self, payload: bytes) -> bytes | None:
        record = self.record
        chunk = json.loads(payload)
        if self.prefix is None:
            head = {k: chunk.get(k) for k in ("id", "object", "created", "model")}
            prefix = json.dumps(head, separators=(",", ":"))[:-1].encode()
            if payload.startswith(prefix):
                self.prefix = prefix
                head["id"], head["model"] = record.request_id, record.route.alias
                self.replacement = json.dumps(head, separators=(",", ":"))[:-1].encode()
        chunk["id"], chunk["model"] = record.request_id, record.route.alias
        choices = chunk.get("choices") or []
        if record.ttft_s is None and any(c.get("text") or (c.get("delta") or {}).get("content") for c in choices):
            record.ttft_s = time.perf_counter() - record.started
        if chunk.get("usage"):
            take_usage(record, chunk["usage"])
            if not choices and not self.client_wants_usage:
                return None
        if not self.client_wants_usage:
            chunk.pop("usage", None)
        out = json.dumps(drop_spec_nulls(chunk), separators=(",", ":")).encode()
        if choices:
            record.stream_chunks.append(out)
        return out


#: scope key under which GatewayApp leaves the ASGI server's own `send`
SERVER_SEND = "loraloop.server_send"


class LastChunk(bytes):
    """The last bytes of a stream: GuardedStreamingResponse sends them with the end of the response
    (one write, the client sees the end at once) and closes the body generator."""


class GuardedStreamingResponse(StreamingResponse):
    """The streaming response of a forwarded stream.

    It watches for the client's disconnect with one plain task and calls `on_disconnect` (which cuts
    the upstream stream, so the body generator ends at once and vLLM aborts the request) — lighter
    than Starlette's task group with cancel scopes per response. `on_close` runs however the response
    ends, also when the client is gone before the body generator ever started."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        on_disconnect: Callable[[], None],
        on_close: Callable[[], None],
        **kw: Any,
    ) -> None:
        super().__init__(content, **kw)
        self._on_disconnect = on_disconnect
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        watcher = asyncio.get_running_loop().create_task(self._watch(receive))
        try:
            await self.stream_response(send, scope.get(SERVER_SEND, send))
        finally:
            watcher.cancel()
            self._on_close()

    async def stream_response(self, send: Any, body_send: Any = None) -> None:
        """The start goes through the middleware's `send` (they note that the response started); the
        body, one message per batch of upstream events, through `body_send`: the server's own send
        when the app put it in the scope (GatewayApp), which skips Starlette's pass-through wrappers
        on every chunk. No middleware of the gateway transforms a response body."""
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        send = body_send or send
        body, ended = self.body_iterator, False
        try:
            async for chunk in body:  # the generator is run to its end after a LastChunk (it returns then)
                if ended:
                    continue
                if isinstance(chunk, str):
                    chunk = chunk.encode(self.charset)
                ended = type(chunk) is LastChunk
                await send(
                    {"type": "http.response.body", "body": bytes(chunk) if ended else chunk, "more_body": not ended}
                )
            if not ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _watch(self, receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._on_disconnect()
