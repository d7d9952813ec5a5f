"""A gateway (and its managed vLLM) served by uvicorn in a background thread of this process — what the
demo runs and the integration tests share."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from core.settings import Settings


@dataclass
class LocalGateway:
    app: FastAPI
    settings: Settings
    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def client(self, key: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=300, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=120)


def start_local_gateway(settings: Settings, model_path: str | None, *, wait_healthy_s: float = 900) -> LocalGateway:
    """Start the gateway; return once /health is 200 (vLLM up and adapters loaded)."""
    from serving.app import build_app

    app = build_app(settings, model_path=model_path, log_dir=settings.cache_dir / "logs")
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                            timeout_keep_alive=settings.keepalive_s)  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    live = LocalGateway(app, settings, f"http://{settings.host}:{settings.port}", server, thread)
    deadline = time.monotonic() + wait_healthy_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{live.url}/health", timeout=2).status_code == 200:
                return live
        except httpx.HTTPError:
            pass
        if not thread.is_alive():
            break
        time.sleep(1)
    live.stop()
    raise RuntimeError(f"the gateway did not become healthy; vLLM's log is in {settings.cache_dir / 'logs'}")
