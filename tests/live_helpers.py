"""Helpers for the tests that run against the real parts: the session's vLLM behind its own gateway, a
second gateway in front of that same vLLM, vLLM's engine paused on purpose, synthetic feedback stores."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import LiveGateway, live_settings, start_gateway


def vllm_url(live: LiveGateway) -> str:
    """The URL of the vLLM a managed live gateway runs."""
    return f"http://127.0.0.1:{live.settings.backends.managed.port}"


def engine_processes(live: LiveGateway) -> list[psutil.Process]:
    """vLLM's engine processes (EngineCore and its workers) under the gateway's managed vLLM.

    Pausing these stalls generation while vLLM's API server still answers: `/health` stays 200 and a stream's
    headers come at once, only the tokens do not — a hung or overloaded engine, for real."""
    managed = live.app.state.managed
    assert managed is not None and managed.pid is not None, "the live gateway has no managed vLLM"
    procs = [p for p in psutil.Process(managed.pid).children(recursive=True) if p.name().startswith("VLLM::")]
    assert procs, "no VLLM::EngineCore process found under the managed vLLM"
    return procs


@contextlib.contextmanager
def engine_paused(live: LiveGateway) -> Iterator[None]:
    """SIGSTOP vLLM's engine for the block, SIGCONT afterwards (always: the session shares this vLLM)."""
    procs = engine_processes(live)
    for p in procs:
        p.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def remote_gateway(live: LiveGateway, cache: Path, **extra: Any) -> Iterator[LiveGateway]:
    """A second gateway (remote mode, no vLLM of its own) in front of the session's vLLM, with its own settings:
    starts in seconds, so a test can change what the shared gateway must keep (timeouts, aliases)."""
    backends = {"mode": "remote", "urls": [vllm_url(live)], "health_interval_s": 1.0, **extra.pop("backends", {})}
    settings = live_settings(Path(str(live.settings.model)), cache, backends=backends, replica_id="remote", **extra)
    gateway = start_gateway(settings, None, wait_healthy_s=120)
    try:
        yield gateway
    finally:
        gateway.stop()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """One sample of a Prometheus exposition (None when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None
