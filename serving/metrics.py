"""The gateway's Prometheus metrics, all prefixed ``loraloop_`` and labelled by alias and adapter
(vLLM's own metrics only know the base model). One registry per app: nothing global."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    """Metric objects of one gateway, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.requests = Counter(
            "loraloop_requests",
            "Requests served by the gateway, by alias, adapter, endpoint and HTTP status.",
            ["alias", "adapter", "endpoint", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "loraloop_request_duration_seconds",
            "End-to-end request latency seen by the gateway (until the last byte).",
            ["alias", "adapter", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "loraloop_time_to_first_token_seconds",
            "Time from request arrival to the first generated token (streaming requests).",
            ["alias", "adapter", "endpoint"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "loraloop_prompt_tokens",
            "Prompt tokens processed, as reported by vLLM.",
            ["alias", "adapter"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "loraloop_completion_tokens",
            "Completion tokens generated, as reported by vLLM.",
            ["alias", "adapter"],
            registry=r,
        )
        self.in_flight = Gauge("loraloop_requests_in_flight", "Requests currently being served.", ["alias"], registry=r)
        self.backend_up = Gauge(
            "loraloop_backend_up", "1 when a vLLM back-end passes its health check.", ["backend"], registry=r
        )
        self.backend_restarts = Counter(
            "loraloop_backend_restarts",
            "Restarts of a managed vLLM back-end after it died.",
            ["backend"],
            registry=r,
        )
        self.backend_failures = Counter(
            "loraloop_backend_failures",
            "Forwarded requests that failed to reach a back-end (connect errors, timeouts).",
            ["backend"],
            registry=r,
        )
        self.adapter_ops = Counter(
            "loraloop_adapter_operations",
            "Adapter loads and unloads on vLLM back-ends, by result.",
            ["op", "result"],
            registry=r,
        )
        self.adapter_op_duration = Histogram(
            "loraloop_adapter_operation_duration_seconds",
            "Duration of one adapter load or unload on one back-end.",
            ["op"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.adapters_loaded = Gauge(
            "loraloop_adapters_loaded", "Adapters loaded on a back-end.", ["backend"], registry=r
        )
        self.alias_adapter = Gauge(
            "loraloop_alias_adapter",
            "1 for the adapter each alias points to now (`base` for the base model).",
            ["alias", "adapter"],
            registry=r,
        )

    def child(self, metric: MetricWrapperBase, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: labels() validates and locks on every call, and the
        per-request metrics are touched several times per request. Only for children never removed."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found
