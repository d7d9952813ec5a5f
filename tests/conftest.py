"""Shared fixtures: the tiny model and ONE real vLLM CPU server (managed by a real gateway) per test
session — vLLM takes about a minute to start here, so every integration test shares it."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from core.settings import Settings
from deploy.local import LocalGateway, start_local_gateway
from tests.adapter_factory import make_label_adapter
from tests.fake_vllm import build_fake_vllm, reset_fake_vllm, serve_in_thread

API_KEY = "sk-live-test-key-42"
ADMIN_KEY = "adm-live-test-key-42"
REPO = Path(__file__).resolve().parent.parent
BASE_ALIASES: dict[str, Any] = {"tiny": {}, "tiny-greedy": {"defaults": {"temperature": 0.0, "max_tokens": 8}}}
SHARED = Path(os.environ.get("LORALOOP_SHARED_DIR", REPO.parent / "shared"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class FakeBackends:
    """One fake vLLM app behind two loopback servers (two back-end URLs, one shared state)."""

    app: FastAPI
    urls: list[str]


@pytest.fixture(scope="session")
def fake_backends() -> Iterator[FakeBackends]:
    app = build_fake_vllm()
    with serve_in_thread(app) as a, serve_in_thread(app) as b:
        yield FakeBackends(app, [a, b])


@pytest.fixture
def fake_vllm(fake_backends: FakeBackends) -> FakeBackends:
    """The shared fake back-ends, reset for this test."""
    reset_fake_vllm(fake_backends.app)
    return fake_backends


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from retrain.models.prepare import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def adapter_root(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter root holding two valid (untrained, zero-delta) adapters for the tiny base."""
    root = tmp_path_factory.mktemp("adapters")
    for name in ("support-v1", "support-v2"):
        make_label_adapter(tiny_model_dir, root / name, "unused", rank=4, steps=0)
    return root


@pytest.fixture(scope="session")
def label_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter root with two trained adapters: `alpha` and `bravo` answer their own name."""
    root = tmp_path_factory.mktemp("label-adapters")
    for label in ("alpha", "bravo"):
        make_label_adapter(tiny_model_dir, root / label, label, rank=8, steps=60, seed=0)
    return root


class LiveGateway(LocalGateway):
    """A local gateway whose clients carry the test API key by default."""

    def client(self, key: str | None = API_KEY, **kw: Any) -> httpx.Client:
        return super().client(key, **kw)


def start_gateway(settings: Settings, model_path: str | None, *, wait_healthy_s: float = 600) -> LiveGateway:
    g = start_local_gateway(settings, model_path, wait_healthy_s=wait_healthy_s)
    return LiveGateway(g.app, g.settings, g.url, g.server, g.thread)


def live_settings(model_dir: Path, cache: Path, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "model": str(model_dir),
        "model_cache_dir": str(cache),
        "port": free_port(),
        "api_key": API_KEY,
        "admin_key": ADMIN_KEY,
        "backends": {
            "mode": "managed",
            "health_interval_s": 1.0,
            "managed": {"port": free_port(), "max_model_len": 1024, "startup_timeout_s": 600},
        },
        "aliases": BASE_ALIASES,
        "store": {"root": str(cache / "events"), "flush_interval_s": 0.02},
        "replica_id": "live",
    }
    values.update(extra)
    return Settings(**values)


@pytest.fixture(scope="session")
def live_gateway(
    tiny_model_dir: Path, label_adapters: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveGateway]:
    cache = tmp_path_factory.mktemp("live-cache")
    settings = live_settings(
        tiny_model_dir,
        cache,
        adapter_root=str(label_adapters),
        state_dir=str(cache / "state"),
        adapters={"alpha": {"path": "alpha"}, "bravo": {"path": "bravo"}},
        aliases={
            **BASE_ALIASES,
            "labeler": {"adapter": "alpha", "defaults": {"temperature": 0.0, "max_tokens": 8}},
            "ab": {"adapter": "alpha", "defaults": {"temperature": 0.0, "max_tokens": 8}},
            "private": {"log_text": False, "defaults": {"max_tokens": 4}},
        },
    )
    live = start_gateway(settings, str(tiny_model_dir))
    yield live
    live.stop()
