"""The serving class behind /v1/completions, /v1/chat/completions and /v1/responses: resolve the alias,
apply its template, forward to a healthy vLLM back-end, and stream the answer back with loraloop's ids
(what /v1/responses does differently is in responses.py)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from fastapi.responses import JSONResponse, StreamingResponse

from core.serving_config import AliasConfig
from core.settings import Settings
from feedback.experiments import ExperimentRepo

from .adapters import AdapterManager
from .backends import Backend, BackendPool
from .errors import OpenAIError
from .protocol import ChatCompletionRequest, CompletionRequest, ResponsesRequest
from .records import Endpoint, Observer, RequestRecord, Route, take_choices
from .responses import ResponseEventRewriter, apply_responses_template, take_response, upstream_body
from .streaming import (
    ChunkRewriter,
    GuardedStreamingResponse,
    LastChunk,
    drop_spec_nulls,
    error_status,
    take_usage,
)
from .upstream import UpstreamClient, UpstreamError, UpstreamResponse

logger = logging.getLogger(__name__)

_PATHS: dict[Endpoint, str] = {
    "chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses"
}  # fmt: skip
_ID_PREFIX: dict[Endpoint, str] = {"chat": "chatcmpl-", "completions": "cmpl-", "responses": "resp_"}
_DEFAULTED = ("temperature", "top_p", "max_tokens")

ADAPTER_HEADER = "x-loraloop-adapter"
ARM_HEADER = "x-loraloop-arm"
EXPERIMENT_HEADER = "x-loraloop-experiment"
REQUEST_ID_HEADER = "x-request-id"


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
    elif endpoint == "responses":
        apply_responses_template(body, config)
        return
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


class OpenAIServing:
    """Forwards OpenAI requests for aliases to the back-end pool."""

    def __init__(
        self,
        settings: Settings,
        pool: BackendPool,
        resolver: AliasResolver,
        upstream: UpstreamClient,
        observers: list[Observer] | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.resolver = resolver
        self.upstream = upstream
        self.observers: list[Observer] = observers or []
        #: awaited after a request's observers ran and before its response completes (durable logging)
        self.commit: Callable[[], Awaitable[None]] | None = None

    # --- entry points ----------------------------------------------------------------------------
    async def create(
        self,
        endpoint: Endpoint,
        request: ChatCompletionRequest | CompletionRequest | ResponsesRequest,
        user_header: str | None,
    ) -> JSONResponse | StreamingResponse:
        self.resolver.check(request.model)
        body = request.model_dump(exclude_unset=True, mode="json")
        user = request.user or user_header
        route = self.resolver.resolve(request.model, user)
        metrics = self.pool.metrics
        metrics.child(metrics.in_flight, route.alias).inc()
        apply_alias_template(endpoint, body, route.config)
        body["model"] = route.target_model
        stream = bool(request.stream)
        request_id = _ID_PREFIX[endpoint] + uuid.uuid4().hex
        if endpoint == "responses":
            upstream_body(body, request_id)
        elif stream:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        record = RequestRecord(
            request_id=request_id,
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
        if resp.status >= 400:
            try:
                payload = await resp.read()
            except UpstreamError as exc:
                payload = str(exc).encode()
            backend.in_flight -= 1
            error = upstream_error(resp.status, payload, backend.url)
            self._finish(record, error.status, error.message)
            return error.response(headers)
        if not stream:
            return await self._complete(record, backend, resp, headers)
        # vLLM validates some requests only once the stream has started: look at the first event so
        # such an error gets its real HTTP status instead of a 200 followed by an error event.
        batches = resp.events()
        try:
            first = await anext(batches, None)
        except UpstreamError as exc:
            if exc.kind == "timeout":  # vLLM took the request, then sent nothing in time: a timeout, as before the head
                backend.in_flight -= 1
                resp.close()
                timeout = OpenAIError(504, f"the vLLM back-end timed out: {exc}", code="backend_timeout")
                self._finish(record, timeout.status, timeout.message)
                return timeout.response(headers)
            first = [json.dumps({"error": {"message": f"back-end stream broke: {exc}", "code": 502}}).encode()]
        if first and first[0].startswith(b'{"error"'):
            backend.in_flight -= 1
            resp.close()
            error = upstream_error(error_status(first[0]), first[0], backend.url)
            self._finish(record, error.status, error.message)
            return error.response(headers)

        def client_gone() -> None:  # cut the upstream stream: the body generator ends with a 499
            if not record.finished:
                record.client_gone = True
                resp.close()

        def close_if_never_streamed() -> None:  # the client left before the body generator started
            if not record.finished:
                backend.in_flight -= 1
                self._finish(record, 499, "client closed the connection")
                resp.close()

        rewrite = (
            ResponseEventRewriter(record)
            if isinstance(request, ResponsesRequest)
            else ChunkRewriter(record, request.wants_usage_in_stream)
        )
        return GuardedStreamingResponse(
            self._stream(record, backend, resp, first or [], batches, rewrite),
            on_disconnect=client_gone,
            on_close=close_if_never_streamed,
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # --- forwarding ------------------------------------------------------------------------------
    async def _send(self, record: RequestRecord) -> tuple[Backend, UpstreamResponse]:
        tried: set[str] = set()
        payload = msgspec.json.encode(record.body)
        while True:
            backend = self.pool.pick(tried)
            backend.in_flight += 1
            try:
                resp = await self.upstream.post(backend.url + _PATHS[record.endpoint], payload)
            except UpstreamError as exc:
                backend.in_flight -= 1
                if exc.kind == "timeout":
                    raise OpenAIError(504, f"the vLLM back-end timed out: {exc}", code="backend_timeout") from exc
                if exc.kind == "failed":
                    raise OpenAIError(502, f"the vLLM back-end failed: {exc}", code="backend_error") from exc
                self.pool.metrics.backend_failures.labels(backend.url).inc()
                self.pool.mark_down(backend, str(exc))
                tried.add(backend.url)  # try the next healthy back-end; pick() raises 503 when none is left
                continue
            record.backend = backend.url
            return backend, resp

    async def _complete(
        self, record: RequestRecord, backend: Backend, resp: UpstreamResponse, headers: dict[str, str]
    ) -> JSONResponse:
        try:
            payload = await resp.read()
        except UpstreamError as exc:
            self._finish(record, 502, str(exc))
            raise OpenAIError(502, f"the vLLM back-end failed mid-response: {exc}", code="backend_error") from exc
        finally:
            backend.in_flight -= 1
        try:
            data = json.loads(payload)
            data["id"], data["model"] = record.request_id, record.route.alias
        except (ValueError, TypeError) as exc:  # not a JSON object: a broken or wrong back-end
            self._finish(record, 502, f"invalid JSON from the back-end: {exc}")
            raise OpenAIError(502, "the vLLM back-end answered with invalid JSON", code="backend_error") from exc
        if record.endpoint == "responses":
            take_response(record, data)
        else:
            drop_spec_nulls(data)
            self._take_usage(record, data.get("usage"))
            take_choices(record, data.get("choices"))
        self._finish(record, 200, None)
        await self._commit()
        return JSONResponse(data, headers=headers)

    async def _stream(
        self,
        record: RequestRecord,
        backend: Backend,
        resp: UpstreamResponse,
        first: list[bytes],
        batches: AsyncIterator[list[bytes]],
        rewrite: ChunkRewriter | ResponseEventRewriter,
    ) -> AsyncIterator[bytes]:
        """The client's stream: each batch of upstream events that arrived together goes out as one write.
        Chat and completions streams end with `[DONE]`; a /v1/responses stream with the end of vLLM's message."""
        status, error = 200, None
        frame = rewrite.frame_prefix
        complete = False
        try:
            batch: list[bytes] | None = first
            while batch is not None:
                out: list[bytes] = []
                for payload in batch:
                    if payload == b"[DONE]":
                        if not record.finished:
                            backend.in_flight -= 1
                            self._finish(record, status, error)
                            if out:  # what came before [DONE] is not held back by the commit
                                yield b"".join(out)
                                out = []
                            await self._commit()  # the event is durable before the client sees the end
                        complete = True
                        out.append(b"data: [DONE]\n\n")
                        # the end of the stream and of the response in one write; vLLM's own end of
                        # message is not waited for (the connection goes back to the pool when it comes)
                        yield LastChunk(b"".join(out))
                        return
                    elif payload.startswith(b'{"error"'):
                        status, error = error_status(payload), payload.decode(errors="replace")
                        out += (b"data: ", payload, b"\n\n")
                    else:
                        chunk = rewrite(payload)
                        if chunk is not None:
                            out += (frame, chunk, b"\n\n")
                if out:
                    yield b"".join(out)
                batch = await anext(batches, None)
            # vLLM's message ended without [DONE]: how a /v1/responses stream ends (after its last event)
            if not record.finished:
                backend.in_flight -= 1
                failure = rewrite.failure
                self._finish(record, 502 if failure else status, failure or error)
                await self._commit()  # the event is durable before the client sees the end
            complete = True
        except UpstreamError as exc:
            if record.client_gone:  # we cut the upstream ourselves
                status, error = 499, "client closed the stream"
            else:
                status, error = 502, f"back-end stream broke: {exc}"
                err = {"error": {"message": error, "type": "api_error", "param": None, "code": "backend_error"}}
                yield f"data: {json.dumps(err)}\n\n".encode()
        except BaseException:  # cancelled (server shutting down): still log what was served
            status, error = 499, "client closed the stream"
            raise
        finally:
            if not record.finished:
                backend.in_flight -= 1
            self._finish(record, status, error)
            if complete:
                resp.release_at_end()  # the connection goes back to the pool
            else:
                resp.close()  # vLLM aborts a request whose connection drops

    # --- bookkeeping -----------------------------------------------------------------------------
    async def _commit(self) -> None:
        if self.commit is not None:
            try:
                await self.commit()
            except Exception:  # logging must never fail a served request
                logger.exception("request event could not be made durable")

    @staticmethod
    def _take_usage(record: RequestRecord, usage: dict[str, Any] | None) -> None:
        take_usage(record, usage)

    def _finish(self, record: RequestRecord, status: int, error: str | None) -> None:
        """Close the books on a request, exactly once."""
        if record.finished:
            return
        record.finished = True
        self.resolver.release(record.route)
        metrics = self.pool.metrics
        metrics.child(metrics.in_flight, record.route.alias).dec()
        record.status, record.error = status, error
        record.latency_s = time.perf_counter() - record.started
        for observe in self.observers:
            try:
                observe(record)
            except Exception:  # an observer must never break serving
                logger.exception("request observer failed")
