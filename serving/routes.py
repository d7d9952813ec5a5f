"""HTTP routes of the gateway: thin, everything real happens in the serving class."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from .dependencies import ApiKey, HealthGuard, MetricsGuard, ServingDep, check_api_key
from .errors import OpenAIError
from .openai_serving import OpenAIServing
from .protocol import ChatCompletionRequest, CompletionRequest, ResponsesRequest
from .records import Endpoint
from .responses import check_stateless

router = APIRouter()

Req = TypeVar("Req", ChatCompletionRequest, CompletionRequest, ResponsesRequest)


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI description of a body the route parses itself (nested models inlined, since the
    schema's own `$defs` are not where an OpenAPI document resolves references)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise OpenAIError(413, f"request body larger than {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # chunked uploads have no content-length to check up front
            raise OpenAIError(413, f"request body larger than {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _forward(
    request: Request, endpoint: Endpoint, model: type[Req], check: Callable[[Req], None] | None = None
) -> Response:
    """The generation routes read their parts from app.state and parse the body with pydantic's
    JSON parser themselves: FastAPI's dependency and body machinery took about a quarter of the
    gateway's CPU per request (bench/gateway_cpu.py), and requests of a burst wait for it."""
    state = request.app.state
    check_api_key(request, state.settings)
    raw = await _read_body(request, state.settings.max_request_bytes)
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    if check is not None:
        check(body)
    serving: OpenAIServing = state.serving
    return await serving.create(endpoint, body, request.headers.get("x-loraloop-user"))


@router.post("/v1/chat/completions", response_model=None, openapi_extra=_json_body(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    return await _forward(request, "chat", ChatCompletionRequest)


@router.post("/v1/completions", response_model=None, openapi_extra=_json_body(CompletionRequest))
async def completions(request: Request) -> Response:
    return await _forward(request, "completions", CompletionRequest)


@router.post("/v1/responses", response_model=None, openapi_extra=_json_body(ResponsesRequest))
async def responses(request: Request) -> Response:
    return await _forward(request, "responses", ResponsesRequest, check_stateless)


@router.api_route("/v1/responses/{response_id:path}", methods=["GET", "POST", "DELETE"], include_in_schema=False)
async def stored_response(response_id: str, _: ApiKey) -> Response:
    """Retrieving, cancelling, deleting a response or listing its input items needs stored responses."""
    raise OpenAIError(400, f"`{response_id}`: responses are not stored, so they cannot be retrieved, cancelled, "
                      "deleted or listed; keep what POST /v1/responses answered", param="response_id",
                      code="unsupported_endpoint")  # fmt: skip


def _model_card(request: Request, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": request.app.state.created, "owned_by": "loraloop"}


@router.get("/v1/models")
async def list_models(request: Request, serving: ServingDep, _: ApiKey) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(request, n) for n in serving.resolver.names()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request, serving: ServingDep, _: ApiKey) -> dict[str, Any]:
    serving.resolver.check(model_id)  # 404 in OpenAI's shape when unknown
    return _model_card(request, model_id)


@router.get("/health")
async def health(serving: ServingDep, _: HealthGuard) -> JSONResponse:
    pool = serving.pool
    body = {
        "status": "ok" if pool.any_healthy else "unavailable",
        "backends": [b.state() for b in pool.backends],
    }
    return JSONResponse(body, status_code=200 if pool.any_healthy else 503)


@router.get("/metrics")
async def metrics(request: Request, _: MetricsGuard) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
