"""The events the gateway (and the admin tools) write to the store."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FeedbackKind = Literal["thumbs", "score", "label", "correction", "comment", "regenerate", "copy"]
FeedbackSource = Literal["user", "annotator", "automatic"]

_INT32 = 2**31 - 1
_THUMBS_UP = {"up", "+1", "1", "true", "yes", "good", "👍"}
_THUMBS_DOWN = {"down", "-1", "0", "false", "no", "bad", "👎"}
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
MAX_CORRECTED_CALLS = 128


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def new_id() -> str:
    """A fresh random id (32 hex digits)."""
    return uuid.uuid4().hex


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ts: datetime = Field(default_factory=utcnow, description="When it happened (UTC; naive values are UTC).")

    @field_validator("ts")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return _as_utc(value)


class ToolCallLog(BaseModel):
    """One tool call the model made, as it wrote it (``arguments`` is its JSON text, valid or not)."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(default=None, description="The call's id, when the back-end gave one.")
    name: str = Field(description="The function called.")
    arguments: str = Field(default="", description="The arguments as the model wrote them (JSON text).")


def corrected_tool_calls(value: dict[str, Any]) -> dict[str, Any]:
    """A correction given as the assistant message that was wanted, normalised for the store:
    ``{"content": str | None, "tool_calls": [{"id", "name", "arguments"}]}`` (the shape of a logged choice's
    calls; ``arguments`` as compact JSON text). Accepts OpenAI's message shape (``{"role": "assistant",
    "content": ..., "tool_calls": [{"type": "function", "function": {"name", "arguments"}}]}``, arguments as
    JSON text or an object). Raises ValueError saying what is wrong."""
    unknown = set(value) - {"role", "content", "tool_calls"}
    if unknown:
        raise ValueError(f"a tool-call correction has only role, content and tool_calls (not {sorted(unknown)})")
    if value.get("role", "assistant") != "assistant":
        raise ValueError("a tool-call correction is an assistant message (role must be 'assistant')")
    content, calls = value.get("content"), value.get("tool_calls")
    if content is not None and not isinstance(content, str):
        raise ValueError("correction content must be a string or null")
    if not isinstance(calls, list) or not calls or len(calls) > MAX_CORRECTED_CALLS:
        raise ValueError(f"a tool-call correction needs tool_calls: a list of 1 to {MAX_CORRECTED_CALLS} calls")
    return {"content": content, "tool_calls": [_corrected_call(i, c) for i, c in enumerate(calls)]}


def _corrected_call(i: int, call: Any) -> dict[str, Any]:
    where = f"tool_calls[{i}]"
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise ValueError(f"{where} must be an object with a function: {{name, arguments}}")
    if call.get("type", "function") != "function":
        raise ValueError(f"{where}.type must be 'function'")
    name, arguments = call["function"].get("name"), call["function"].get("arguments", {})
    if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
        raise ValueError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-'")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise ValueError(f"{where}.function.arguments is not valid JSON") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}.function.arguments must be a JSON object")
    call_id = call.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise ValueError(f"{where}.id must be a string")
    text = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return {"id": call_id, "name": name, "arguments": text}


class ChoiceLog(BaseModel):
    """One choice of a response (``n`` > 1 gives several)."""

    model_config = ConfigDict(extra="forbid")
    index: int = Field(ge=0, le=_INT32, description="The choice's index.")
    text: str | None = Field(default=None, description="Its text (what was streamed before a cut-off).")
    finish_reason: str | None = Field(default=None, description="`stop`, `length`, `tool_calls`, ...")
    tool_calls: list[ToolCallLog] = Field(default_factory=list, description="Its tool calls, streamed ones joined.")


class RequestEvent(_Event):
    """One completed (or failed, or cut-off) generation request, logged once when it ends."""

    request_id: str = Field(min_length=1, description="Unique id of this generation (gateway-generated).")
    alias: str = Field(description="Client-visible model name the request asked for.")
    endpoint: Literal["chat", "completions", "responses"] = Field(
        description="Which OpenAI endpoint served it (`responses`: logged in chat's shape, messages and all)."
    )
    experiment_id: str | None = Field(default=None, description="Experiment the request was part of, if any.")
    arm: str | None = Field(default=None, description="Arm of that experiment that served it.")
    adapter: str | None = Field(default=None, description="LoRA adapter that served it; None = the base model.")
    user: str | None = Field(default=None, description="The OpenAI `user` field or the user header.")
    messages: list[dict[str, Any]] | None = Field(default=None, description="Chat messages as sent to the model.")
    prompt: str | None = Field(default=None, description="Prompt of a completions request.")
    completion: str | None = Field(default=None, description="Generated text (what was streamed before a cut-off).")
    choices: list[ChoiceLog] | None = Field(
        default=None, description="Every choice: text, finish reason, tool calls (`completion` is choice 0's text)."
    )
    tools: list[dict[str, Any]] | None = Field(default=None, description="The `tools` the request offered.")
    tool_choice: str | dict[str, Any] | None = Field(default=None, description="The request's `tool_choice`.")
    response_format: dict[str, Any] | None = Field(default=None, description="The request's `response_format`.")
    params: dict[str, Any] = Field(default_factory=dict, description="Sampling parameters actually used.")
    prompt_tokens: int | None = Field(default=None, ge=0, le=_INT32, description="Prompt length in tokens.")
    completion_tokens: int | None = Field(default=None, ge=0, le=_INT32, description="Completion length in tokens.")
    latency_ms: float = Field(ge=0, description="Time from request received to last byte sent.")
    ttft_ms: float | None = Field(default=None, ge=0, description="Time to first token (streaming).")
    status: int = Field(ge=0, le=999, description="HTTP status returned (499 when the client went away).")
    error: str | None = Field(default=None, description="Error message, if the request failed.")
    stream: bool = Field(default=False, description="Whether the response was streamed.")
    finish_reason: str | None = Field(default=None, description="`stop`, `length`, ..., or None when cut off.")
    replica: str = Field(description="Gateway replica that served it.")


class FeedbackEvent(_Event):
    """Feedback about one request. ``feedback_id`` makes client retries idempotent.

    ``value`` is normalised by ``kind``: thumbs → bool (True = up), score → float, label / comment → str,
    correction → str (the wanted text) or the wanted assistant message with tool calls (see
    :func:`corrected_tool_calls`); regenerate and copy take any value (usually None).
    """

    feedback_id: str = Field(default_factory=new_id, min_length=1, description="Client-supplied or generated.")
    request_id: str = Field(min_length=1, description="Request the feedback is about (may not be logged yet).")
    choice_index: int | None = Field(
        default=None, ge=0, le=_INT32, description="The choice of an `n` > 1 response it is about; None = choice 0."
    )
    kind: FeedbackKind = Field(description="What sort of feedback this is.")
    value: float | str | bool | dict[str, Any] | None = Field(
        default=None, description="The feedback itself, see the class docs."
    )
    user: str | None = Field(default=None, description="Who gave it.")
    source: FeedbackSource = Field(default="user", description="A user, an annotator or an automatic signal.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free metadata (label, task, slice...).")

    @model_validator(mode="after")
    def _normalise_value(self) -> FeedbackEvent:
        value = self.value
        if self.kind == "thumbs":
            if isinstance(value, bool):
                return self
            text = str(value).strip().lower() if value is not None else ""
            if isinstance(value, int | float) and value in (1, -1, 0):
                text = "1" if value == 1 else "0"
            if text in _THUMBS_UP:
                self.value = True
            elif text in _THUMBS_DOWN:
                self.value = False
            else:
                raise ValueError("thumbs feedback needs a value of true/false, up/down or 1/-1")
        elif self.kind == "score":
            if isinstance(value, bool | dict) or value is None:
                raise ValueError("score feedback needs a numeric value")
            try:
                self.value = float(value)
            except ValueError:
                raise ValueError("score feedback needs a numeric value") from None
        elif self.kind == "correction" and isinstance(value, dict):
            self.value = corrected_tool_calls(value)
        elif self.kind in ("label", "correction", "comment") and (not isinstance(value, str) or not value):
            raise ValueError(f"{self.kind} feedback needs a non-empty string value")
        return self


class AssignmentEvent(_Event):
    """A user (or an anonymous request) was exposed to an arm of an experiment."""

    event_id: str = Field(default_factory=new_id, description="Unique id (deduplication key).")
    experiment_id: str = Field(description="The experiment.")
    alias: str = Field(description="Alias the experiment runs on.")
    arm: str = Field(description="The arm the user was assigned to.")
    user: str | None = Field(default=None, description="The user; None for per-request random assignment.")
    request_id: str | None = Field(default=None, description="The request that caused the exposure.")


class AdapterChangeEvent(_Event):
    """An alias started to be served by another adapter (or by the base model)."""

    event_id: str = Field(default_factory=new_id, description="Unique id (deduplication key).")
    alias: str = Field(description="The alias that changed.")
    adapter: str | None = Field(description="The adapter now serving it; None = base model.")
    previous: str | None = Field(default=None, description="The adapter that served it before.")
    actor: str = Field(description="Who or what made the change (admin API, promotion job...).")
    reason: str = Field(default="", description="Why.")


StreamEvent = RequestEvent | AssignmentEvent | AdapterChangeEvent
