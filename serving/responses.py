"""POST /v1/responses on the chat path's machinery: what differs from chat is here — the stateful features
the gateway refuses, the alias template on `input`, the request sent on to vLLM, the answer's output items
taken into the request record, and the stream's `response.*` events passed on (with the alias as `model`)."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from core.serving_config import AliasConfig

from .errors import OpenAIError
from .protocol import ResponsesRequest
from .records import RequestRecord, str_or_none

_NOT_STORED = (
    "the gateway keeps no response state (its replicas share none, and vLLM keeps it in one process's memory "
    "only): send the whole conversation in `input` with every request"
)


def check_stateless(request: ResponsesRequest) -> None:
    """Refuse what needs state kept across requests (and so across replicas): a 400 naming the field."""
    refused: list[tuple[str, bool]] = [
        ("previous_response_id", request.previous_response_id is not None),
        ("conversation", request.conversation is not None),
        ("store", bool(request.store)),
        ("background", bool(request.background)),
        ("prompt", request.prompt is not None),
    ]
    for field, present in refused:
        if present:
            what = "stored prompt templates are not supported" if field == "prompt" else _NOT_STORED
            raise OpenAIError(400, f"`{field}` is not supported: {what}", param=field, code="unsupported_parameter")
    if isinstance(request.input, list):
        for i, item in enumerate(request.input):
            if item.get("type") == "item_reference":
                raise OpenAIError(400, f"input items by reference are not supported: {_NOT_STORED}",
                                  param=f"input.{i}", code="unsupported_parameter")  # fmt: skip


def _is_lead_message(item: dict[str, Any]) -> bool:
    return item.get("type", "message") == "message" and item.get("role") in ("system", "developer")


def apply_responses_template(body: dict[str, Any], config: AliasConfig) -> None:
    """The alias's system prompt (unless the request has `instructions` or a leading system/developer
    message) and few-shot examples as input messages, in place; its sampling defaults where the request has
    none. The system prompt goes into `input`, not `instructions`, which vLLM echoes back to the client."""
    if config.system_prompt or config.few_shot:
        items = body["input"]
        items = [{"role": "user", "content": items}] if isinstance(items, str) else items
        n_lead = next((i for i, item in enumerate(items) if not _is_lead_message(item)), len(items))
        lead = items[:n_lead]
        if not lead and not body.get("instructions") and config.system_prompt:
            lead = [{"role": "system", "content": config.system_prompt}]
        shots = [
            message
            for ex in config.few_shot
            for message in ({"role": "user", "content": ex.user}, {"role": "assistant", "content": ex.assistant})
        ]
        body["input"] = lead + shots + items[n_lead:]
    defaults = config.defaults
    for field, default in (("temperature", defaults.temperature), ("top_p", defaults.top_p),
                           ("max_output_tokens", defaults.max_tokens)):  # fmt: skip
        if default is not None and body.get(field) is None:
            body[field] = default


def upstream_body(body: dict[str, Any], request_id: str) -> None:
    """What vLLM gets besides the client's fields: the gateway's id as vLLM's request id (vLLM answers with
    it as the response's `id`, in every event too), and `store: false` (nothing kept in vLLM's memory)."""
    body["request_id"] = request_id
    body["store"] = False


def take_response(record: RequestRecord, response: dict[str, Any]) -> None:
    """A whole Response object into the record: usage, the output text and function calls as choice 0,
    and the finish reason chat would have given (`stop`, `tool_calls`, `length`, `content_filter`)."""
    usage = response.get("usage")
    if isinstance(usage, dict):
        record.prompt_tokens, record.completion_tokens = usage.get("input_tokens"), usage.get("output_tokens")
    calls = 0
    for item in response.get("output") or []:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "message":
            for part in item.get("content") or []:
                if isinstance(part, dict) and part.get("type") == "output_text":
                    record.add_text(0, str_or_none(part.get("text")))
        elif kind == "function_call":
            record.add_tool_call(0, calls, str_or_none(item.get("call_id")), str_or_none(item.get("name")),
                                 str_or_none(item.get("arguments")))  # fmt: skip
            calls += 1
    details = response.get("incomplete_details")
    if response.get("status") == "incomplete" and isinstance(details, dict):
        reason = details.get("reason")
        record.add_finish(0, "length" if reason == "max_output_tokens" else str_or_none(reason))
    elif response.get("status") == "completed":
        record.add_finish(0, "tool_calls" if calls else "stop")


#: the event's own `type` (the nested objects' types never start with `response.`; an error event's is `error`)
_EVENT_TYPE = re.compile(rb'"type":"(response\.[a-z_.]+|error)"')
#: events that carry the whole Response object (its `model` is the adapter's name: the alias replaces it)
_WHOLE = frozenset({b"response.created", b"response.in_progress", b"response.queued", b"response.completed",
                    b"response.incomplete", b"response.failed"})  # fmt: skip
_LAST = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})
_GENERATED = (b'"response.output_text.delta"', b'"response.function_call_arguments.delta"')


class ResponseEventRewriter:
    """Passes vLLM's `response.*` events on as `event: <type>` + `data:` frames. Deltas go through as bytes;
    the few events with the whole Response object are parsed to put the alias in as `model` (the id is already
    the gateway's), and the last one gives the request record its output. Text deltas are kept, so a stream
    cut short still logs what was sent."""

    #: the frames carry their own `event:` line, so `_stream` puts nothing before them
    frame_prefix = b""

    def __init__(self, record: RequestRecord) -> None:
        self.record = record
        self.failure: str | None = None

    def __call__(self, payload: bytes) -> bytes | None:
        record = self.record
        found = _EVENT_TYPE.search(payload)
        kind = found.group(1) if found else None
        if record.ttft_s is None and any(marker in payload for marker in _GENERATED):
            record.ttft_s = time.perf_counter() - record.started
        if kind == b"response.output_text.delta":
            record.stream_chunks.append(payload)
        elif kind in _WHOLE:
            payload = self._whole(payload, kind in _LAST)
        elif kind == b"error":
            self.failure = _error_message(payload)
        return b"event: " + kind + b"\ndata: " + payload if kind else b"data: " + payload

    def _whole(self, payload: bytes, last: bool) -> bytes:
        event = json.loads(payload)
        response = event.get("response")
        if not isinstance(response, dict):
            return payload
        response["id"], response["model"] = self.record.request_id, self.record.route.alias
        if last:
            self.record.stream_chunks.clear()  # the whole output is here: the deltas are not needed
            take_response(self.record, response)
            if response.get("status") == "failed":
                self.failure = _error_message(json.dumps(response.get("error")).encode())
        return json.dumps(event, separators=(",", ":")).encode()


def _error_message(payload: bytes) -> str:
    try:
        data = json.loads(payload)
    except ValueError:
        return payload.decode(errors="replace")
    message = data.get("message") if isinstance(data, dict) else None
    return f"the response failed: {message or payload.decode(errors='replace')}"
