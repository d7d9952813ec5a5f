"""The serving class behind /v1/completions and /v1/chat/completions: resolve the alias, apply its
template, forward to a healthy vLLM back-end, and stream the answer back with loraloop's ids."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import httpx
from fastapi.responses import JSONResponse, StreamingResponse

from feedback.experiments import Arm, Experiment, ExperimentRepo

from .adapters import AdapterManager
from .backends import Backend, BackendPool
from .errors import OpenAIError
from .protocol import ChatCompletionRequest, CompletionRequest
from .settings import AliasConfig, Settings

logger = logging.getLogger(__name__)

Endpoint = Literal["chat", "completions"]
_PATHS: dict[Endpoint, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
_ID_PREFIX: dict[Endpoint, str] = {"chat": "chatcmpl-", "completions": "cmpl-"}
_DEFAULTED = ("temperature", "top_p", "max_tokens")

ADAPTER_HEADER = "x-loraloop-adapter"
ARM_HEADER = "x-loraloop-arm"
EXPERIMENT_HEADER = "x-loraloop-experiment"
REQUEST_ID_HEADER = "x-request-id"


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
    #: raw stream chunks passed through without parsing; parsed in one go when the text is asked for
    stream_chunks: list[str] = field(default_factory=list)

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
        chunks, self.stream_chunks = json.loads("[" + ",".join(self.stream_chunks) + "]"), []
        for chunk in chunks:
            for choice in chunk.get("choices") or []:
                part = choice.get("text") if self.endpoint == "completions" else (choice.get("delta") or {})
                self.add_text(choice.get("index", 0), part if isinstance(part, str) else part.get("content"))
                self.finish_reason = choice.get("finish_reason") or self.finish_reason


Observer = Callable[[RequestRecord], None]


class AliasResolver:
    """Maps a client-visible model name to its route: the arm of a running experiment on the alias
    (sticky per user), else the adapter the alias points to. The adapter is counted in flight until
    the request ends, so a repoint never unloads an adapter under a running request."""

    def __init__(self, settings: Settings, adapters: AdapterManager, experiments: ExperimentRepo | None) -> None:
        self.settings = settings
        self.adapters = adapters
        self.experiments = experiments

    def names(self) -> list[str]:
        return list(self.settings.aliases)

    def check(self, name: str) -> AliasConfig:
        config = self.settings.aliases.get(name)
        if config is None:
            raise OpenAIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return config

    def resolve(self, name: str, user: str | None = None) -> Route:
        """The route for one request; pair every call with `release`."""
        config = self.check(name)
        adapter, experiment, arm = self.adapters.routes[name], None, None
        assigned = self.experiments.assign(name, user) if self.experiments is not None else None
        if assigned is not None:
            exp, chosen = assigned
            if chosen.adapter is None or self.adapters.ready(chosen.adapter):
                adapter, experiment, arm = chosen.adapter, exp, chosen
            else:  # not loaded here yet (created on another replica): default route meanwhile
                self.adapters.load_soon(chosen.adapter)
        self.adapters.acquire(adapter)
        target = adapter or self.settings.backends.served_model_name
        return Route(name, config, adapter, target, experiment, arm)

    def release(self, route: Route) -> None:
        self.adapters.release(route.adapter)


def apply_alias_template(endpoint: Endpoint, body: dict[str, Any], config: AliasConfig) -> None:
    """Add the alias's system prompt, few-shot examples and default sampling parameters in place."""
    if endpoint == "chat":
        messages: list[dict[str, Any]] = body["messages"]
        n_lead = next((i for i, m in enumerate(messages) if m.get("role") not in ("system", "developer")), 0)
        lead = messages[:n_lead]
        if not lead and config.system_prompt:
            lead = [{"role": "system", "content": config.system_prompt}]
        shots = [
            m
            for ex in config.few_shot
            for m in ({"role": "user", "content": ex.user}, {"role": "assistant", "content": ex.assistant})
        ]
        body["messages"] = lead + shots + messages[n_lead:]
    elif isinstance(body.get("prompt"), str) and (config.system_prompt or config.few_shot):
        parts = [config.system_prompt] if config.system_prompt else []
        parts += [f"{ex.user}\n{ex.assistant}" for ex in config.few_shot]
        body["prompt"] = "\n\n".join([*parts, body["prompt"]])
    for name in _DEFAULTED:
        default = getattr(config.defaults, name)
        if default is None or body.get(name) is not None:
            continue
        if name == "max_tokens" and body.get("max_completion_tokens") is not None:
            continue
        body[name] = default


def upstream_error(status: int, payload: bytes, backend: str) -> OpenAIError:
    """Turn a vLLM error response into the gateway's OpenAI-style error."""
    message, param, code, etype = f"back-end {backend} answered HTTP {status}", None, None, None
    try:
        err = json.loads(payload).get("error") or {}
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            param = err.get("param")
            code = str(err["code"]) if isinstance(err.get("code"), str) else None
    except (ValueError, AttributeError):
        pass
    if status >= 500:
        return OpenAIError(502, f"the vLLM back-end failed: {message}", code="backend_error")
    if status == 404:  # the adapter of the alias is not loaded there: our problem, not the client's
        return OpenAIError(503, f"the back-end cannot serve this alias right now: {message}",
                           code="adapter_unavailable")  # fmt: skip
    return OpenAIError(status, message, type=etype, param=param if isinstance(param, str) else None, code=code)


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


async def _sse_payloads(resp: httpx.Response) -> AsyncIterator[str]:
    """The `data:` payloads of a server-sent-event stream, one per event."""
    async for line in resp.aiter_lines():
        if line.startswith("data:"):
            yield line[5:].strip()


def _error_status(payload: str) -> int:
    try:
        code = json.loads(payload)["error"].get("code")
    except (ValueError, KeyError, AttributeError):
        return 502
    return code if isinstance(code, int) and 400 <= code < 600 else 502


def _take_usage(record: RequestRecord, usage: dict[str, Any] | None) -> None:
    if usage:
        record.prompt_tokens = usage.get("prompt_tokens")
        record.completion_tokens = usage.get("completion_tokens")


class _ChunkRewriter:
    """Puts loraloop's id and the alias into vLLM's stream chunks.

    vLLM serialises every chunk of a stream with the same prefix (`{"id":..,"object":..,"created":..,
    "model":..`), so the common case is a string splice; a chunk is parsed only when it carries usage or
    nulls the OpenAI schema does not allow. The text is recovered from the raw chunks after the stream.
    """

    _SLOW_MARKERS = ('"usage":{', '"tool_calls":null', '"function_call":null', '"annotations":null')

    def __init__(self, record: RequestRecord, client_wants_usage: bool) -> None:
        self.record = record
        self.client_wants_usage = client_wants_usage
        self.prefix: str | None = None
        self.replacement = ""
        self.content_marker = '"text":"' if record.endpoint == "completions" else '"delta":{"content":"'

    def __call__(self, payload: str) -> str | None:
        record = self.record
        if record.ttft_s is None and self.content_marker in payload:
            record.ttft_s = time.perf_counter() - record.started
        if (
            self.prefix is not None
            and payload.startswith(self.prefix)
            and not any(m in payload for m in self._SLOW_MARKERS)
        ):
            record.stream_chunks.append(payload)
            return self.replacement + payload[len(self.prefix) :]
        return self._slow(payload)

    def _slow(self, payload: str) -> str | None:
        record = self.record
        chunk = json.loads(payload)
        if self.prefix is None:
            head = {k: chunk.get(k) for k in ("id", "object", "created", "model")}
            prefix = json.dumps(head, separators=(",", ":"))[:-1]
            if payload.startswith(prefix):
                self.prefix = prefix
                head["id"], head["model"] = record.request_id, record.route.alias
                self.replacement = json.dumps(head, separators=(",", ":"))[:-1]
        chunk["id"], chunk["model"] = record.request_id, record.route.alias
        choices = chunk.get("choices") or []
        if record.ttft_s is None and any(c.get("text") or (c.get("delta") or {}).get("content") for c in choices):
            record.ttft_s = time.perf_counter() - record.started
        if chunk.get("usage"):
            _take_usage(record, chunk["usage"])
            if not choices and not self.client_wants_usage:
                return None
        if not self.client_wants_usage:
            chunk.pop("usage", None)
        out = json.dumps(drop_spec_nulls(chunk), separators=(",", ":"))
        if choices:
            record.stream_chunks.append(out)
        return out


class GuardedStreamingResponse(StreamingResponse):
    """A streaming response that runs `on_close` however the response ends — also when the client
    is gone before the body generator ever started (its `finally` would then never run)."""

    def __init__(self, content: AsyncIterator[bytes], *, on_close: Callable[[], Awaitable[None]], **kw: Any):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()


class OpenAIServing:
    """Forwards OpenAI requests for aliases to the back-end pool."""

    def __init__(
        self,
        settings: Settings,
        pool: BackendPool,
        resolver: AliasResolver,
        observers: list[Observer] | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.resolver = resolver
        self.observers: list[Observer] = observers or []
        #: awaited after a request's observers ran and before its response completes (durable logging)
        self.commit: Callable[[], Awaitable[None]] | None = None
        key = settings.backends.api_key
        self._upstream_headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}

    # --- entry points ----------------------------------------------------------------------------
    async def create(
        self, endpoint: Endpoint, request: ChatCompletionRequest | CompletionRequest, user_header: str | None
    ) -> JSONResponse | StreamingResponse:
        self.resolver.check(request.model)
        body = request.model_dump(exclude_unset=True, mode="json")
        user = request.user or user_header
        route = self.resolver.resolve(request.model, user)
        self.pool.metrics.in_flight.labels(route.alias).inc()
        apply_alias_template(endpoint, body, route.config)
        body["model"] = route.target_model
        stream = bool(request.stream)
        if stream:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        record = RequestRecord(
            request_id=_ID_PREFIX[endpoint] + uuid.uuid4().hex,
            endpoint=endpoint,
            route=route,
            body=body,
            user=user,
            stream=stream,
        )
        try:
            backend, resp = await self._send(record)
        except OpenAIError as exc:
            self._finish(record, exc.status, exc.message)
            raise
        headers = {REQUEST_ID_HEADER: record.request_id, ADAPTER_HEADER: route.adapter or "base"}
        if route.arm is not None and route.experiment is not None:
            headers[ARM_HEADER] = route.arm.name
            headers[EXPERIMENT_HEADER] = route.experiment.id
        if resp.status_code >= 400:
            payload = await resp.aread()
            await self._release(backend, resp)
            error = upstream_error(resp.status_code, payload, backend.url)
            self._finish(record, error.status, error.message)
            return error.response(headers)
        if not stream:
            return await self._complete(record, backend, resp, headers)
        # vLLM validates some requests only once the stream has started: look at the first event so
        # such an error gets its real HTTP status instead of a 200 followed by an error event.
        events = _sse_payloads(resp)
        try:
            first = await anext(events, None)
        except httpx.HTTPError as exc:
            first = json.dumps({"error": {"message": f"back-end stream broke: {exc}", "code": 502}})
        if first is not None and first.startswith('{"error"'):
            await self._release(backend, resp)
            error = upstream_error(_error_status(first), first.encode(), backend.url)
            self._finish(record, error.status, error.message)
            return error.response(headers)

        async def close_if_never_streamed() -> None:  # the client left before the first byte
            if not record.finished:
                backend.in_flight -= 1
                self._finish(record, 499, "client closed the connection")
                await resp.aclose()

        return GuardedStreamingResponse(
            self._stream(record, backend, resp, first, events, request.wants_usage_in_stream),
            on_close=close_if_never_streamed,
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # --- forwarding ------------------------------------------------------------------------------
    async def _send(self, record: RequestRecord) -> tuple[Backend, httpx.Response]:
        tried: set[str] = set()
        while True:
            backend = self.pool.pick(tried)
            req = self.pool.client.build_request(
                "POST", backend.url + _PATHS[record.endpoint], json=record.body, headers=self._upstream_headers
            )
            backend.in_flight += 1
            try:
                try:
                    resp = await self.pool.client.send(req, stream=True)
                except (httpx.RemoteProtocolError, httpx.ReadError):
                    # a pooled keep-alive connection the server had just closed: retry once, fresh
                    resp = await self.pool.client.send(req, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                backend.in_flight -= 1
                self.pool.metrics.backend_failures.labels(backend.url).inc()
                self.pool.mark_down(backend, f"{type(exc).__name__}: {exc}")
                tried.add(backend.url)  # try the next healthy back-end; pick() raises 503 when none is left
                continue
            except httpx.TimeoutException as exc:
                backend.in_flight -= 1
                raise OpenAIError(504, f"the vLLM back-end timed out: {exc}", code="backend_timeout") from exc
            except httpx.HTTPError as exc:
                backend.in_flight -= 1
                raise OpenAIError(502, f"the vLLM back-end failed: {exc}", code="backend_error") from exc
            record.backend = backend.url
            return backend, resp

    async def _release(self, backend: Backend, resp: httpx.Response) -> None:
        backend.in_flight -= 1
        await resp.aclose()

    async def _complete(
        self, record: RequestRecord, backend: Backend, resp: httpx.Response, headers: dict[str, str]
    ) -> JSONResponse:
        try:
            payload = await resp.aread()
        except httpx.HTTPError as exc:
            self._finish(record, 502, str(exc))
            raise OpenAIError(502, f"the vLLM back-end failed mid-response: {exc}") from exc
        finally:
            await self._release(backend, resp)
        data = json.loads(payload)
        data["id"], data["model"] = record.request_id, record.route.alias
        drop_spec_nulls(data)
        self._take_usage(record, data.get("usage"))
        for choice in data.get("choices") or []:
            text = (
                choice.get("text") if record.endpoint == "completions" else (choice.get("message") or {}).get("content")
            )
            record.add_text(choice.get("index", 0), text)
            record.finish_reason = record.finish_reason or choice.get("finish_reason")
        self._finish(record, 200, None)
        await self._commit()
        return JSONResponse(data, headers=headers)

    async def _stream(
        self,
        record: RequestRecord,
        backend: Backend,
        resp: httpx.Response,
        first: str | None,
        events: AsyncIterator[str],
        client_wants_usage: bool,
    ) -> AsyncIterator[bytes]:
        status, error = 200, None
        rewrite = _ChunkRewriter(record, client_wants_usage)
        try:
            payload = first
            while payload is not None:
                if payload == "[DONE]":
                    if not record.finished:
                        backend.in_flight -= 1
                        self._finish(record, status, error)
                        await self._commit()  # the event is durable before the client sees the end
                    yield b"data: [DONE]\n\n"
                elif payload.startswith('{"error"'):
                    status, error = _error_status(payload), payload
                    yield f"data: {payload}\n\n".encode()
                else:
                    out = rewrite(payload)
                    if out is not None:
                        yield b"data: " + out.encode() + b"\n\n"
                payload = await anext(events, None)
        except httpx.HTTPError as exc:
            status, error = 502, f"back-end stream broke: {exc}"
            err = {"error": {"message": error, "type": "api_error", "param": None, "code": "backend_error"}}
            yield f"data: {json.dumps(err)}\n\n".encode()
        except BaseException:  # client went away (cancelled): still log what was served
            status, error = 499, "client closed the stream"
            raise
        finally:
            # bookkeeping first: under anyio a cancelled scope re-raises at every await
            if not record.finished:
                backend.in_flight -= 1
            self._finish(record, status, error)
            with anyio.CancelScope(shield=True):
                await resp.aclose()

    # --- bookkeeping -----------------------------------------------------------------------------
    async def _commit(self) -> None:
        if self.commit is not None:
            try:
                await self.commit()
            except Exception:  # logging must never fail a served request
                logger.exception("request event could not be made durable")

    @staticmethod
    def _take_usage(record: RequestRecord, usage: dict[str, Any] | None) -> None:
        _take_usage(record, usage)

    def _finish(self, record: RequestRecord, status: int, error: str | None) -> None:
        """Close the books on a request, exactly once."""
        if record.finished:
            return
        record.finished = True
        self.resolver.release(record.route)
        self.pool.metrics.in_flight.labels(record.route.alias).dec()
        record.status, record.error = status, error
        record.latency_s = time.perf_counter() - record.started
        for observe in self.observers:
            try:
                observe(record)
            except Exception:  # an observer must never break serving
                logger.exception("request observer failed")
