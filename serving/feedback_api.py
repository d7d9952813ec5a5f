"""The gateway side of the event store: every finished request becomes a RequestEvent (through the
store's bounded queue — the request path never waits on disk), every experiment assignment an
AssignmentEvent, every repoint an AdapterChangeEvent; `POST /v1/feedback` stores feedback durably
before it answers."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from core.settings import Settings
from feedback.events import (
    AdapterChangeEvent,
    AssignmentEvent,
    FeedbackEvent,
    FeedbackKind,
    FeedbackSource,
    RequestEvent,
    new_id,
)
from feedback.store import EventStore, StoreError

from .dependencies import ApiKey, SettingsDep, StoreDep
from .errors import OpenAIError
from .records import RequestRecord, logged_messages

router = APIRouter()

#: OpenAPI examples of POST /v1/feedback (docs/api.md shows the same; a test checks both against the schema).
FEEDBACK_EXAMPLES: list[JsonValue] = [
    {"request_id": "chatcmpl-7d2f0c9e8b1a4e7c9f3a2b1c0d9e8f7a", "kind": "thumbs", "value": False, "user": "u-1842"},
    {"request_id": "chatcmpl-7d2f0c9e8b1a4e7c9f3a2b1c0d9e8f7a", "kind": "correction", "value": "billing",
     "user": "u-1842", "metadata": {"task": "routing"}, "feedback_id": "ticket-99812-fix"},
    {"request_id": "cmpl-0a1b2c3d4e5f60718293a4b5c6d7e8f9", "kind": "score", "value": 5, "source": "annotator"},
    {"request_id": "chatcmpl-5e1d9a7c3b2f4e6a8c0d1f2e3a4b5c6d", "choice_index": 1, "kind": "thumbs", "value": True},
    {"request_id": "chatcmpl-9b8a7c6d5e4f30211f2e3d4c5b6a7980", "kind": "correction",
     "value": {"content": None, "tool_calls": [{"type": "function", "function": {
         "name": "lookup_order", "arguments": "{\"order_id\": \"A-1042\"}"}}]}},
]  # fmt: skip

#: Request fields kept as the event's sampling parameters.
SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "top_k",
)


def _list_of_objects(value: Any) -> list[dict[str, Any]] | None:
    """``value`` when it is a list of JSON objects (what `tools` must be), else None: an odd shape that vLLM
    refused is not a reason to lose the request's log line."""
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return value
    return None


def request_event_observer(store: EventStore, settings: Settings) -> Callable[[RequestRecord], None]:
    def observe(record: RequestRecord) -> None:
        route, body = record.route, record.logged_body  # a /v1/responses request in chat's shape
        exp, arm = route.experiment, route.arm
        ts = datetime.fromtimestamp(record.started_at, UTC)
        if exp is not None and arm is not None:
            store.submit(
                AssignmentEvent(
                    ts=ts,
                    experiment_id=exp.id,
                    alias=route.alias,
                    arm=arm.name,
                    user=record.user,
                    request_id=record.request_id,
                )
            )
        event = RequestEvent(
            ts=ts,
            request_id=record.request_id,
            alias=route.alias,
            endpoint=record.endpoint,
            experiment_id=exp.id if exp is not None else None,
            arm=arm.name if arm is not None else None,
            adapter=route.adapter,
            user=record.user,
            messages=logged_messages(body.get("messages")) if record.endpoint != "completions" else None,
            prompt=body["prompt"] if isinstance(body.get("prompt"), str) else None,
            completion=record.completion_text if record.status == 200 or record.texts or record.stream_chunks else None,
            choices=record.choice_logs() or None,
            tools=_list_of_objects(body.get("tools")),
            tool_choice=body.get("tool_choice") if isinstance(body.get("tool_choice"), str | dict) else None,
            response_format=body.get("response_format") if isinstance(body.get("response_format"), dict) else None,
            params={k: body[k] for k in SAMPLING_KEYS if k in body},
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            latency_ms=(record.latency_s or 0.0) * 1000,
            ttft_ms=record.ttft_s * 1000 if record.ttft_s is not None else None,
            status=record.status,
            error=record.error,
            stream=record.stream,
            finish_reason=record.finish_reason,
            replica=settings.replica_id,
        )
        store.submit(event, log_text=route.config.log_text)

    return observe


def adapter_change_logger(store: EventStore) -> Callable[[str, str | None, str | None], None]:
    def log(alias: str, adapter: str | None, previous: str | None) -> None:
        store.submit(
            AdapterChangeEvent(alias=alias, adapter=adapter, previous=previous, actor="admin-api", reason="repoint")
        )

    return log


class FeedbackIn(BaseModel):
    """Body of POST /v1/feedback (docs/api.md: which kinds are rated, learned from, or only reported)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": FEEDBACK_EXAMPLES})
    request_id: str = Field(min_length=1, max_length=200, description="The completion `id` / x-request-id.")
    choice_index: int | None = Field(
        None, ge=0, le=1024, description="Which choice of an `n` > 1 response it is about (`choices[i].index`); "
        "default: choice 0. Checked against the response when this gateway served it."
    )  # fmt: skip
    kind: FeedbackKind = Field(
        description="`thumbs` and `score` rate the answer (the A/B reports count them); `correction` gives the "
        "answer that was wanted (a training row and a preference pair); `label` tags the request (slices); "
        "`comment`, `regenerate`, `copy` are stored and reported only."
    )
    value: float | str | bool | dict[str, Any] | None = Field(
        None,
        description="By kind: thumbs true/false (also up/down, 1/-1); score a number (>= 4 good, <= 2 bad by "
        "default); label and comment a non-empty string; correction the wanted answer as a non-empty string, or "
        'the wanted assistant message with tool calls (`{"tool_calls": [{"type": "function", '
        '"function": {"name": ..., "arguments": ...}}], "content": null}`: names among the request\'s '
        "tools, arguments a JSON object); regenerate and copy nothing.",
    )
    user: str | None = Field(None, max_length=500, description="Who gave the feedback (your user id).")
    source: FeedbackSource = Field(
        "user", description="`user`, `annotator` or `automatic` (automatic signals never count as ratings)."
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Free attributes kept with the feedback (e.g. `task`, `label`: slices)."
    )
    feedback_id: str | None = Field(
        None, min_length=1, max_length=200, description="Client id: retries are idempotent."
    )
    model: str | None = Field(None, description="The alias the request used (applies its privacy switch).")


def _first_error(exc: ValidationError) -> str:
    """The first problem in words (pydantic's own text ends with a link to its docs, useless to a client)."""
    error = exc.errors()[0]
    return str(error["msg"]).removeprefix("Value error, ")


def check_against_request(event: FeedbackEvent, store: EventStore) -> None:
    """400 when the feedback contradicts the request it names, as far as this gateway served it: a choice
    beyond the response's choices, a corrected tool call to a function the request did not offer."""
    if event.choice_index is not None:
        served = store.served_choices(event.request_id)
        if served is not None and event.choice_index >= served:
            message = f"choice_index {event.choice_index} is out of range: the request returned {served} choice(s)"
            raise OpenAIError(400, message, param="choice_index", code="invalid_value")
    if event.kind == "correction" and isinstance(event.value, dict):
        offered = store.served_tools(event.request_id)
        wrong = sorted({c["name"] for c in event.value["tool_calls"]} - offered) if offered is not None else []
        if wrong:
            names = ", ".join(sorted(offered or ())) or "none"
            message = f"the correction calls {', '.join(wrong)}, which the request did not offer (its tools: {names})"
            raise OpenAIError(400, message, param="value", code="invalid_value")


@router.post("/v1/feedback", response_model=None)
async def post_feedback(body: FeedbackIn, store: StoreDep, settings: SettingsDep, _: ApiKey) -> JSONResponse:
    if not settings.store.enabled:
        message = "feedback is not stored: the event store is disabled (store.enabled)"
        raise OpenAIError(503, message, code="store_disabled")
    try:
        event = FeedbackEvent(
            feedback_id=body.feedback_id or new_id(),
            request_id=body.request_id,
            choice_index=body.choice_index,
            kind=body.kind,
            value=body.value,
            user=body.user,
            source=body.source,
            metadata=body.metadata,
        )
    except ValidationError as exc:
        raise OpenAIError(400, _first_error(exc), param="value", code="invalid_value") from None
    check_against_request(event, store)
    alias = body.model or store.served_alias(body.request_id)
    log_text = settings.aliases[alias].log_text if alias in settings.aliases else True
    try:
        stored, created = await anyio.to_thread.run_sync(lambda: store.write_feedback(event, log_text=log_text))
    except StoreError as exc:
        raise OpenAIError(503, f"feedback not stored: {exc}", code="store_unavailable") from None
    payload = {
        "id": stored.feedback_id,
        "object": "feedback",
        "request_id": stored.request_id,
        "kind": stored.kind,
        "created": created,
    }
    return JSONResponse(payload, status_code=201 if created else 200)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
