"""Shared fixtures of the feedback tests: real DuckDB, real files under tmp_path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from core.store_config import StoreConfig
from feedback.events import RequestEvent
from feedback.store import EventStore


def make_request(i: int | str, **overrides: Any) -> RequestEvent:
    """A plausible chat request event with id ``r<i>``."""
    fields: dict[str, Any] = {
        "request_id": f"r{i}",
        "alias": "default",
        "endpoint": "chat",
        "user": f"u{i}",
        "messages": [{"role": "user", "content": f"question {i}"}],
        "completion": f"answer {i}",
        "params": {"temperature": 0.7, "max_tokens": 32},
        "prompt_tokens": 7,
        "completion_tokens": 3,
        "latency_ms": 12.5,
        "ttft_ms": 4.0,
        "status": 200,
        "replica": "gw-test",
        "finish_reason": "stop",
    }
    fields.update(overrides)
    return RequestEvent(**fields)


@pytest.fixture
def config(tmp_path: Path) -> StoreConfig:
    """A store config with fast flushes, rooted in tmp_path."""
    return StoreConfig(root=tmp_path / "events", flush_interval_s=0.01, batch_size=100, queue_size=10_000)


@pytest.fixture
def registry() -> CollectorRegistry:
    """A private Prometheus registry."""
    return CollectorRegistry()


@pytest.fixture
def store(config: StoreConfig, registry: CollectorRegistry) -> Iterator[EventStore]:
    """A started store (writer id gw-test), closed after the test."""
    s = EventStore(config, "gw-test", registry)
    s.start()
    yield s
    s.close()


def metric(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    """Current value of a sample (0 when absent)."""
    value = registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value
