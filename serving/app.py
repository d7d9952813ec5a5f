"""`build_app(settings)`: the gateway. ``init_app_state`` creates its parts and wires them to each other;
``build_app`` only puts them on the app and attaches each router file's routes (as vLLM's api_server)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from core.quantization import PROVENANCE
from core.settings import Settings
from feedback.experiments import ExperimentRepo
from feedback.store import EventStore

from . import admin, experiments_api, feedback_api, routes
from .adapter_checks import BaseModelInfo
from .adapters import AdapterManager
from .backends import BackendPool
from .errors import install_error_handlers
from .feedback_api import adapter_change_logger, request_event_observer
from .managed import ManagedVLLM
from .metrics import GatewayMetrics
from .openai_serving import AliasResolver, OpenAIServing
from .records import RequestRecord
from .registry_metrics import RegistryCollector
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
        provenance = Path(path).expanduser() / PROVENANCE
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


@dataclass
class GatewayState:
    """The gateway's long-lived components (``app.state`` holds the same objects under the same names)."""

    settings: Settings
    metrics: GatewayMetrics
    client: httpx.AsyncClient
    pool: BackendPool
    store: EventStore
    experiments: ExperimentRepo
    adapters: AdapterManager
    upstream: UpstreamClient
    serving: OpenAIServing
    model_path: str | None
    log_dir: Path
    managed: ManagedVLLM | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Start the managed vLLM (if any), the store and the health checks; on the way out, stop them and
        flush and seal every accepted event."""
        b = self.settings.backends
        if b.mode == "managed" and self.model_path is not None:
            self.managed = ManagedVLLM(
                self.model_path, b.served_model_name, b.managed, self.pool, self.metrics, self.log_dir,
                max_lora_rank=self.settings.max_lora_rank, keepalive_s=b.keepalive_s,
            )  # fmt: skip
            self.managed.start()
        app.state.managed = self.managed
        if self.settings.store.enabled:
            self.store.start()  # recovers and seals what a crashed predecessor left
        self.pool.start()
        try:
            yield
        finally:
            await self.adapters.wait_background()
            if self.managed is not None:
                await self.managed.stop()
            await self.pool.stop()
            await self.upstream.aclose()
            await self.client.aclose()
            self.store.close()  # flushes and seals everything accepted

    def attach(self, app: FastAPI) -> None:
        for name in ("settings", "metrics", "pool", "serving", "adapters", "store", "experiments", "managed"):
            setattr(app.state, name, getattr(self, name))
        app.state.created = int(time.time())


def init_app_state(
    settings: Settings,
    *,
    model_path: str | None,
    transport: httpx.AsyncBaseTransport | None = None,
    log_dir: Path | None = None,
) -> GatewayState:
    """Create the gateway's components and wire them to each other (nothing starts until the lifespan)."""
    b = settings.backends
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
    return GatewayState(settings, metrics, client, pool, store, experiments, adapters, upstream, serving, model_path,
                        log_dir or settings.cache_dir / "logs")  # fmt: skip


def build_app(
    settings: Settings,
    *,
    model_path: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    log_dir: Path | None = None,
) -> FastAPI:
    """Create the gateway. ``model_path`` is the prepared base model (a managed back-end serves it;
    adapters are checked against its config), made by ``retrain.models.prepare.prepare_model`` before
    (`loraloop serve` does); ``transport`` lets tests put a fake vLLM behind it. Raises AdapterRejected
    when a configured adapter fails its checks."""
    if settings.backends.mode == "managed" and model_path is None:
        raise ValueError("a managed back-end serves a prepared model: pass model_path (see prepare_model)")
    state = init_app_state(settings, model_path=model_path, transport=transport, log_dir=log_dir)
    app = GatewayApp(title="loraloop gateway", version="0.1.0", lifespan=state.lifespan)
    state.attach(app)
    install_error_handlers(app)
    for attach_router in (routes.attach_router, admin.attach_router, feedback_api.attach_router,
                          experiments_api.attach_router):  # fmt: skip
        attach_router(app)
    return app
