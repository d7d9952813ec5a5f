"""HTTP routes of the gateway: thin, everything real happens in the serving class."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .dependencies import ApiKey, HealthGuard, MetricsGuard, ServingDep, SettingsDep
from .errors import OpenAIError
from .protocol import ChatCompletionRequest, CompletionRequest

router = APIRouter()

UserHeader = Annotated[str | None, Header(alias="x-loraloop-user")]


def _check_size(request: Request, limit: int) -> None:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise OpenAIError(413, f"request body larger than {limit} bytes", code="request_too_large")


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    serving: ServingDep,
    settings: SettingsDep,
    _: ApiKey,
    user: UserHeader = None,
) -> JSONResponse | StreamingResponse:
    _check_size(request, settings.max_request_bytes)
    return await serving.create("chat", body, user)


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest,
    request: Request,
    serving: ServingDep,
    settings: SettingsDep,
    _: ApiKey,
    user: UserHeader = None,
) -> JSONResponse | StreamingResponse:
    _check_size(request, settings.max_request_bytes)
    return await serving.create("completions", body, user)


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
