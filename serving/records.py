"""What happened to one request (``RequestRecord``: its route, status, timings, tokens and text), handed to
every observer when it ends (the metrics, the event store), and the decoder that recovers a stream's text
from its raw chunks for the request log."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from core.serving_config import AliasConfig
from feedback.experiments import Arm, Experiment

Endpoint = Literal["chat", "completions"]


class _Delta(msgspec.Struct):
    content: str | None = None


class _ChunkChoice(msgspec.Struct):
    index: int = 0
    text: str | None = None
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    """What the request log needs of a stream chunk; msgspec skips the rest without building it."""

    choices: list[_ChunkChoice] | None = None


_STREAM_CHUNKS = msgspec.json.Decoder(list[_Chunk])


def stream_texts(raw: bytes, *, chat: bool) -> list[tuple[int, str | None, str | None]]:
    """(choice index, text, finish reason) of every choice in a JSON array of stream chunks. Typed
    decoding of only those fields is fast; anything of an unexpected shape falls back to plain JSON."""
    try:
        return [
            (c.index, (c.delta.content if c.delta else None) if chat else c.text, c.finish_reason)
            for chunk in _STREAM_CHUNKS.decode(raw)
            for c in chunk.choices or ()
        ]
    except msgspec.ValidationError:
        out: list[tuple[int, str | None, str | None]] = []
        for chunk in json.loads(raw):
            for c in chunk.get("choices") or []:
                part = (c.get("delta") or {}).get("content") if chat else c.get("text")
                index = c.get("index") if isinstance(c.get("index"), int) else 0
                reason = c.get("finish_reason") if isinstance(c.get("finish_reason"), str) else None
                out.append((index, part if isinstance(part, str) else None, reason))
        return out


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
    finished: bool = False
    #: the client disconnected mid-stream (the upstream stream was cut on purpose)
    client_gone: bool = False
    #: raw stream chunks passed through without parsing; parsed in one go when the text is asked for
    stream_chunks: list[bytes] = field(default_factory=list)

    @property
    def completion_text(self) -> str:
        self._parse_stream_chunks()
        return "".join(self.texts.get(0, []))

    def add_text(self, index: int, text: str | None) -> None:
        if text:
            self.texts.setdefault(index, []).append(text)

    def _parse_stream_chunks(self) -> None:
        if not self.stream_chunks:
            return
        raw, self.stream_chunks = b"[" + b",".join(self.stream_chunks) + b"]", []
        for index, text, finish_reason in stream_texts(raw, chat=self.endpoint == "chat"):
            self.add_text(index, text)
            self.finish_reason = finish_reason or self.finish_reason


Observer = Callable[[RequestRecord], None]
