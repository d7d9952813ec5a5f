"""`build_app(settings)`: the one place where the gateway's parts are created and wired."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
from fastapi import FastAPI

from .backends import Backend, BackendPool
from .errors import install_error_handlers
from .managed import ManagedVLLM
from .metrics import GatewayMetrics
from .openai_serving import AliasResolver, OpenAIServing, RequestRecord
from .routes import router
from .settings import Settings

logger = logging.getLogger(__name__)


def backend_urls(settings: Settings) -> list[str]:
    b = settings.backends
    return [f"http://{b.managed.host}:{b.managed.port}"] if b.mode == "managed" else list(b.urls)


def metrics_observer(metrics: GatewayMetrics) -> Callable[[RequestRecord], None]:
    def observe(record: RequestRecord) -> None:
        alias, adapter = record.route.alias, record.route.adapter or "base"
        metrics.requests.labels(alias, adapter, record.endpoint, str(record.status)).inc()
        if record.latency_s is not None:
            metrics.request_duration.labels(alias, adapter, record.endpoint).observe(record.latency_s)
        if record.ttft_s is not None:
            metrics.time_to_first_token.labels(alias, adapter, record.endpoint).observe(record.ttft_s)
        if record.prompt_tokens:
            metrics.prompt_tokens.labels(alias, adapter).inc(record.prompt_tokens)
        if record.completion_tokens:
            metrics.completion_tokens.labels(alias, adapter).inc(record.completion_tokens)

    return observe


def adapter_loader(settings: Settings, client: httpx.AsyncClient) -> Callable[[Backend], Awaitable[None]]:
    """Join hook: load every configured adapter on a back-end before it takes traffic."""
    headers = {}
    if settings.backends.api_key:
        headers["Authorization"] = f"Bearer {settings.backends.api_key.get_secret_value()}"

    async def load(backend: Backend) -> None:
        for name, adapter in settings.adapters.items():
            resp = await client.post(
                f"{backend.url}/v1/load_lora_adapter",
                json={"lora_name": name, "lora_path": str(adapter.path.expanduser().resolve())},
                headers=headers,
                timeout=120.0,
            )
            if resp.status_code != 200 and "already" not in resp.text:
                raise RuntimeError(f"loading adapter {name!r} failed: HTTP {resp.status_code} {resp.text[:300]}")

    return load


def build_app(
    settings: Settings,
    *,
    model_path: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    log_dir: Path | None = None,
) -> FastAPI:
    """Create the gateway. ``model_path`` is the prepared base model for a managed back-end
    (prepared on start-up when not given); ``transport`` lets tests put a fake vLLM behind it."""
    b = settings.backends
    metrics = GatewayMetrics()
    client = httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(b.request_timeout_s, connect=b.connect_timeout_s),
        # keep-alive shorter than uvicorn's 5 s on the vLLM side, so we rarely reuse a closing socket
        limits=httpx.Limits(max_connections=2000, max_keepalive_connections=256, keepalive_expiry=2.0),
    )
    pool = BackendPool(
        backend_urls(settings),
        client,
        metrics,
        health_interval_s=b.health_interval_s,
        health_timeout_s=b.health_timeout_s,
    )
    pool.add_join_hook(adapter_loader(settings, client))
    resolver = AliasResolver(settings)
    serving = OpenAIServing(settings, pool, resolver, observers=[metrics_observer(metrics)])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        managed: ManagedVLLM | None = None
        if b.mode == "managed":
            path = model_path
            if path is None:
                from .model_prep import prepare_model

                path = await asyncio.to_thread(prepare_model, settings.model, settings.cache_dir)
            managed = ManagedVLLM(
                path, b.served_model_name, b.managed, pool, metrics, log_dir or settings.cache_dir / "logs"
            )
            managed.start()
        app.state.managed = managed
        pool.start()
        try:
            yield
        finally:
            if managed is not None:
                await managed.stop()
            await pool.stop()
            await client.aclose()

    app = FastAPI(title="loraloop gateway", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.pool = pool
    app.state.serving = serving
    app.state.created = int(time.time())
    app.state.managed = None
    install_error_handlers(app)
    app.include_router(router)
    return app
