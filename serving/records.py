"""What happened to one request (``RequestRecord``: its route, status, timings, tokens and text), handed to
every observer when it ends (the metrics, the event store), and the decoder that recovers a stream's text
from its raw chunks for the request log."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from core.serving_config import AliasConfig
from feedback.experiments import Arm, Experiment

from .responses_log import chat_view

Endpoint = Literal["chat", "completions", "responses"]


class _FunctionDelta(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _FunctionDelta | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _ChunkChoice(msgspec.Struct):
    index: int = 0
    text: str | None = None
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    """What the request log needs of a stream chunk; msgspec skips the rest without building it."""

    choices: list[_ChunkChoice] | None = None


_STREAM_CHUNKS = msgspec.json.Decoder(list[_Chunk])


class _TextDelta(msgspec.Struct):
    """A /v1/responses `response.output_text.delta` event: what the log needs of it."""

    delta: str | None = None


_TEXT_DELTAS = msgspec.json.Decoder(list[_TextDelta])


@dataclass
class StreamPart:
    """One choice's share of one stream chunk: text, finish reason, tool-call fragments."""

    index: int
    text: str | None = None
    finish_reason: str | None = None
    #: (tool call index, id, function name, arguments fragment): OpenAI streams a call in pieces
    tool_calls: list[tuple[int, str | None, str | None, str | None]] = field(default_factory=list)


def _typed_parts(raw: bytes, chat: bool) -> list[StreamPart]:
    parts = []
    for chunk in _STREAM_CHUNKS.decode(raw):
        for c in chunk.choices or ():
            delta = c.delta if chat else None
            calls = [_call(t) for t in delta.tool_calls or ()] if delta else []
            text = (delta.content if delta else None) if chat else c.text
            parts.append(StreamPart(c.index, text, c.finish_reason, calls))
    return parts


def _call(t: _ToolCallDelta) -> tuple[int, str | None, str | None, str | None]:
    return t.index, t.id, t.function.name if t.function else None, t.function.arguments if t.function else None


def str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _lenient_parts(raw: bytes, chat: bool) -> list[StreamPart]:
    parts = []
    for chunk in json.loads(raw):
        for c in chunk.get("choices") or []:
            delta = c.get("delta") or {} if chat else {}
            calls = []
            for t in delta.get("tool_calls") or [] if isinstance(delta, dict) else []:
                fn = t.get("function") or {}
                index = t.get("index") if isinstance(t.get("index"), int) else 0
                calls.append((index, str_or_none(t.get("id")), str_or_none(fn.get("name")),
                              str_or_none(fn.get("arguments"))))  # fmt: skip
            text = str_or_none(delta.get("content") if chat else c.get("text"))
            index = c.get("index") if isinstance(c.get("index"), int) else 0
            parts.append(StreamPart(index, text, str_or_none(c.get("finish_reason")), calls))
    return parts


def stream_parts(raw: bytes, *, chat: bool) -> list[StreamPart]:
    """Every choice's parts in a JSON array of stream chunks. Typed decoding of only those fields is fast;
    anything of an unexpected shape falls back to plain JSON."""
    try:
        return _typed_parts(raw, chat)
    except msgspec.ValidationError:
        return _lenient_parts(raw, chat)


@dataclass
class Route:
    """Where one request goes: the alias the client named and the vLLM model that serves it."""

    alias: str
    config: AliasConfig
    adapter: str | None  # LoRA name, None for the base
    target_model: str  # what vLLM is asked for
    experiment: Experiment | None = None  # the running experiment that assigned the arm
    arm: Arm | None = None


@dataclass
class RequestRecord:
    """What happened to one request; handed to every observer when the request ends."""

    request_id: str
    endpoint: Endpoint
    route: Route
    body: dict[str, Any]
    user: str | None
    stream: bool
    started: float = field(default_factory=time.perf_counter)
    started_at: float = field(default_factory=time.time)
    status: int = 200
    error: str | None = None
    backend: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    finish_reason: str | None = None
    texts: dict[int, list[str]] = field(default_factory=dict)
    #: per choice: its finish reason, and its tool calls by index as [id, name, argument fragments]
    finish_reasons: dict[int, str] = field(default_factory=dict)
    tool_calls: dict[int, dict[int, list[Any]]] = field(default_factory=dict)
    finished: bool = False
    #: the client disconnected mid-stream (the upstream stream was cut on purpose)
    client_gone: bool = False
    #: raw stream chunks passed through without parsing; parsed in one go when the text is asked for
    stream_chunks: list[bytes] = field(default_factory=list)

    @property
    def logged_body(self) -> dict[str, Any]:
        """The request as the log keeps it: chat's and completions' bodies as sent on; a /v1/responses
        request in chat's shape (serving/responses_log.py)."""
        return chat_view(self.body) if self.endpoint == "responses" else self.body

    @property
    def completion_text(self) -> str:
        self._parse_stream_chunks()
        return "".join(self.texts.get(0, []))

    def add_text(self, index: int, text: str | None) -> None:
        if text:
            self.texts.setdefault(index, []).append(text)

    def add_finish(self, index: int, reason: str | None) -> None:
        if reason:
            self.finish_reasons.setdefault(index, reason)
            if index == 0 or self.finish_reason is None:  # the request's own: choice 0's
                self.finish_reason = reason

    def add_tool_call(self, index: int, call: int, call_id: str | None, name: str | None, args: str | None) -> None:
        """One tool call of choice ``index``, whole or (streamed) a fragment of it."""
        entry = self.tool_calls.setdefault(index, {}).setdefault(call, [None, None, []])
        entry[0] = entry[0] or call_id
        entry[1] = entry[1] or name
        if args:
            entry[2].append(args)

    def choice_logs(self) -> list[dict[str, Any]]:
        """Every choice as the request log keeps it: index, text, finish reason, tool calls."""
        self._parse_stream_chunks()
        indexes = sorted({*self.texts, *self.finish_reasons, *self.tool_calls})
        return [
            {
                "index": i,
                "text": "".join(self.texts[i]) if i in self.texts else None,
                "finish_reason": self.finish_reasons.get(i),
                "tool_calls": [
                    {"id": cid, "name": name or "", "arguments": "".join(args)}
                    for _, (cid, name, args) in sorted(self.tool_calls.get(i, {}).items())
                ],
            }
            for i in indexes
        ]

    def _parse_stream_chunks(self) -> None:
        if not self.stream_chunks:
            return
        raw, self.stream_chunks = b"[" + b",".join(self.stream_chunks) + b"]", []
        if self.endpoint == "responses":  # what a cut-off stream sent: its text deltas (choice 0)
            for event in _TEXT_DELTAS.decode(raw):
                self.add_text(0, event.delta)
            return
        for part in stream_parts(raw, chat=self.endpoint == "chat"):
            self.add_text(part.index, part.text)
            self.add_finish(part.index, part.finish_reason)
            for call, call_id, name, args in part.tool_calls:
                self.add_tool_call(part.index, call, call_id, name, args)


# content parts whose payload is media: logged as a reference (hash, type, size), never the bytes
_MEDIA_PARTS = {"image_url": "url", "input_audio": "data", "video_url": "url", "audio_url": "url", "file": "file_data"}


def media_reference(part: dict[str, Any]) -> dict[str, Any]:
    """A content part with media replaced by what identifies it: its type, the SHA-256 and size of its bytes
    (a `data:` URL or base64 data is decoded first; a remote URL is hashed as text, never fetched)."""
    kind = str(part.get("type"))
    inner = part.get(kind)
    payload = inner.get(_MEDIA_PARTS[kind]) if isinstance(inner, dict) else inner
    text = payload if isinstance(payload, str) else json.dumps(payload, default=str)
    ref: dict[str, Any] = {"type": kind, "source": "inline"}
    data = text.encode()
    if text.startswith("data:") and "," in text:
        header, _, encoded = text.partition(",")
        ref["media_type"] = header[5:].split(";")[0] or None
        data = _b64(encoded) if header.endswith(";base64") else encoded.encode()
    elif kind in ("input_audio", "file") and isinstance(payload, str):
        data = _b64(payload)
    else:
        ref["source"] = "url"
    ref |= {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return {"type": kind, "ref": ref}


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        return text.encode()


def _is_media(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in _MEDIA_PARTS


def logged_messages(messages: Any) -> Any:
    """Chat messages as the request log keeps them: media parts as references; everything else as sent
    (tool messages, assistant tool calls, text parts)."""
    if not isinstance(messages, list):
        return messages
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(_is_media(p) for p in content):
            message = {**message, "content": [media_reference(p) if _is_media(p) else p for p in content]}
        out.append(message)
    return out


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def take_choices(record: RequestRecord, choices: Any) -> None:
    """Every choice of a whole (not streamed) response into the record: text, finish reason, tool calls."""
    for choice in choices if isinstance(choices, list) else []:
        choice = _object(choice)
        raw_index = choice.get("index")
        index = raw_index if isinstance(raw_index, int) else 0
        message = _object(choice.get("message"))
        text = choice.get("text") if record.endpoint == "completions" else message.get("content")
        record.add_text(index, str_or_none(text))
        record.add_finish(index, str_or_none(choice.get("finish_reason")))
        calls = message.get("tool_calls")
        for n, call in enumerate(calls if isinstance(calls, list) else []):
            call, fn = _object(call), _object(_object(call).get("function"))
            record.add_tool_call(index, n, str_or_none(call.get("id")), str_or_none(fn.get("name")),
                                 str_or_none(fn.get("arguments")))  # fmt: skip


Observer = Callable[[RequestRecord], None]
