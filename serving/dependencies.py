"""FastAPI dependencies: the app's components and key checks, as ``Annotated`` aliases.

They are ``async def`` although they never await: FastAPI runs plain ``def`` dependencies in a
thread pool, a thread hop per dependency per request on the hot path."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from pydantic import SecretStr

from core.settings import Settings
from feedback.experiments import ExperimentRepo
from feedback.store import EventStore

from .adapters import AdapterManager
from .errors import OpenAIError
from .openai_serving import OpenAIServing


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_serving(request: Request) -> OpenAIServing:
    serving: OpenAIServing = request.app.state.serving
    return serving


async def get_adapters(request: Request) -> AdapterManager:
    adapters: AdapterManager = request.app.state.adapters
    return adapters


async def get_experiments(request: Request) -> ExperimentRepo:
    repo: ExperimentRepo = request.app.state.experiments
    return repo


async def get_store(request: Request) -> EventStore:
    store: EventStore = request.app.state.store
    return store


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, key: SecretStr) -> bool:
    return token is not None and secrets.compare_digest(token.encode(), key.get_secret_value().encode())


def _unauthorized(token: str | None) -> OpenAIError:
    if token is None:
        return OpenAIError(401, "missing API key: send `Authorization: Bearer <key>`", code="missing_api_key")
    return OpenAIError(401, "incorrect API key provided", code="invalid_api_key")


def check_api_key(request: Request, settings: Settings) -> None:
    """Checks the Bearer API key on /v1/* when one is configured (the admin key is accepted too)."""
    if settings.api_key is None:
        return
    token = _bearer(request)
    if _matches(token, settings.api_key) or (settings.admin_key and _matches(token, settings.admin_key)):
        return
    raise _unauthorized(token)


async def require_api_key(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
    check_api_key(request, settings)


async def require_admin_key(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
    """Admin endpoints: refused entirely without a configured admin key; 401 without a valid key,
    403 for the API key."""
    if settings.admin_key is None:
        raise OpenAIError(403, "the admin API is disabled: set LORALOOP_ADMIN_KEY to enable it", code="admin_disabled")
    token = _bearer(request)
    if _matches(token, settings.admin_key):
        return
    if settings.api_key is not None and _matches(token, settings.api_key):
        raise OpenAIError(403, "this key may not use the admin API", code="admin_key_required")
    raise _unauthorized(token)


async def metrics_guard(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
    if settings.metrics_require_key:
        check_api_key(request, settings)


async def health_guard(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
    if settings.health_require_key:
        check_api_key(request, settings)


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServingDep = Annotated[OpenAIServing, Depends(get_serving)]
AdaptersDep = Annotated[AdapterManager, Depends(get_adapters)]
ExperimentsDep = Annotated[ExperimentRepo, Depends(get_experiments)]
StoreDep = Annotated[EventStore, Depends(get_store)]
ApiKey = Annotated[None, Depends(require_api_key)]
AdminKey = Annotated[None, Depends(require_admin_key)]
MetricsGuard = Annotated[None, Depends(metrics_guard)]
HealthGuard = Annotated[None, Depends(health_guard)]
