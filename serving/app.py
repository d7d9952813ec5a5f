"""`build_app(settings)`: the one place where the gateway's parts are created and wired."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from deploy.metrics import RegistryCollector
from feedback.experiments import ExperimentRepo
from feedback.store import EventStore

from .adapter_checks import BaseModelInfo
from .adapters import AdapterManager
from .admin import router as admin_router
from .backends import BackendPool
from .errors import install_error_handlers
from .experiments_api import router as experiments_router
from .feedback_api import adapter_change_logger, request_event_observer
from .feedback_api import router as feedback_router
from .managed import ManagedVLLM
from .metrics import GatewayMetrics
from .openai_serving import AliasResolver, OpenAIServing, RequestRecord
from .routes import router
from .settings import Settings
from .streaming import SERVER_SEND
from .upstream import UpstreamClient, UpstreamTimeouts

logger = logging.getLogger(__name__)


def backend_urls(settings: Settings) -> list[str]:
    b = settings.backends
    return [f"http://{b.managed.host}:{b.managed.port}"] if b.mode == "managed" else list(b.urls)


def metrics_observer(metrics: GatewayMetrics) -> Callable[[RequestRecord], None]:
    def observe(record: RequestRecord) -> None:
        alias, adapter, child = record.route.alias, record.route.adapter or "base", metrics.child
        child(metrics.requests, alias, adapter, record.endpoint, str(record.status)).inc()
        if record.latency_s is not None:
            child(metrics.request_duration, alias, adapter, record.endpoint).observe(record.latency_s)
        if record.ttft_s is not None:
            child(metrics.time_to_first_token, alias, adapter, record.endpoint).observe(record.ttft_s)
        if record.prompt_tokens:
            child(metrics.prompt_tokens, alias, adapter).inc(record.prompt_tokens)
        if record.completion_tokens:
            child(metrics.completion_tokens, alias, adapter).inc(record.completion_tokens)

    return observe


def base_model_info(settings: Settings, model_path: str | None) -> BaseModelInfo | None:
    """What adapters are checked against: the served base's config.json, when the gateway can read it
    (a managed back-end, a preset, or a shared local path; a hub id is looked up in the local cache)."""
    path = model_path or settings.model
    names = [settings.model, settings.backends.served_model_name]
    if Path(path).expanduser().is_dir():
        # adapters trained on the unquantized base fit its quantized checkpoint
        provenance = Path(path).expanduser() / "loraloop-quantization.json"
        if provenance.is_file():
            names.append(str(json.loads(provenance.read_text()).get("source", "")))
        return BaseModelInfo.from_model_dir(Path(path).expanduser(), extra_names=[n for n in names if n])
    try:
        from huggingface_hub import hf_hub_download

        config = hf_hub_download(path, "config.json", local_files_only=True)
        return BaseModelInfo.from_model_dir(Path(config).parent, extra_names=names)
    except Exception:
        logger.warning("the base model's config.json is not readable here: adapters cannot be registered")
        return None


class GatewayApp(FastAPI):
    """FastAPI, plus the ASGI server's own `send` in the scope: streamed bodies go through it
    (GuardedStreamingResponse), not through Starlette's per-message wrappers. Only while no
    middleware is added: one added later might transform bodies, and must see them."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.user_middleware:
            scope[SERVER_SEND] = send
        await super().__call__(scope, receive, send)


def build_app(
    settings: Settings,
    *,
    model_path: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    log_dir: Path | None = None,
) -> FastAPI:
    """Create the gateway. ``model_path`` is the prepared base model (a managed back-end serves it;
    adapters are checked against its config); ``transport`` lets tests put a fake vLLM behind it.
    Raises AdapterRejected when a configured adapter fails its checks."""
    b = settings.backends
    if b.mode == "managed" and model_path is None:
        from .model_prep import prepare_model

        model_path = prepare_model(settings.model, settings.cache_dir)
    metrics = GatewayMetrics()
    metrics.registry.register(RegistryCollector(settings.registry_path, settings.cycle.state_dir))
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
        unhealthy_after=b.unhealthy_after,
    )
    store = EventStore(settings.store, writer_id=settings.replica_id, registry=metrics.registry)
    experiments = ExperimentRepo(settings.store.root, refresh_s=settings.store.experiments_refresh_s)
    adapters = AdapterManager(settings, pool, metrics, base_model_info(settings, model_path))
    adapters.extra_in_use = lambda: {
        arm.adapter for exp in experiments.list() if exp.is_active() for arm in exp.arms if arm.adapter
    }
    if settings.store.enabled:
        adapters.on_change.append(adapter_change_logger(store))
    adapters.load_initial()
    pool.add_join_hook(adapters.prepare_backend)
    resolver = AliasResolver(settings, adapters, experiments)
    observers = [metrics_observer(metrics)]
    if settings.store.enabled:
        observers.append(request_event_observer(store, settings))
    key = b.api_key
    upstream = UpstreamClient(
        UpstreamTimeouts(connect_s=b.connect_timeout_s, read_s=b.request_timeout_s, keepalive_s=b.keepalive_s),
        headers={"Authorization": f"Bearer {key.get_secret_value()}"} if key else None,
    )
    serving = OpenAIServing(settings, pool, resolver, upstream, observers=observers)
    if settings.store.enabled and settings.store.durable_requests:
        serving.commit = store.wait_durable

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        managed: ManagedVLLM | None = None
        if b.mode == "managed" and model_path is not None:
            managed = ManagedVLLM(
                model_path, b.served_model_name, b.managed, pool, metrics, log_dir or settings.cache_dir / "logs",
                max_lora_rank=settings.max_lora_rank, keepalive_s=b.keepalive_s,
            )  # fmt: skip
            managed.start()
        app.state.managed = managed
        if settings.store.enabled:
            store.start()  # recovers and seals what a crashed predecessor left
        pool.start()
        try:
            yield
        finally:
            await adapters.wait_background()
            if managed is not None:
                await managed.stop()
            await pool.stop()
            await upstream.aclose()
            await client.aclose()
            store.close()  # flushes and seals everything accepted

    app = GatewayApp(title="loraloop gateway", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.pool = pool
    app.state.serving = serving
    app.state.adapters = adapters
    app.state.store = store
    app.state.experiments = experiments
    app.state.created = int(time.time())
    app.state.managed = None
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(admin_router)
    app.include_router(feedback_router)
    app.include_router(experiments_router)
    return app
