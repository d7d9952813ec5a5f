"""Prometheus metrics of the event store, registered on a registry the caller owns."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class StoreMetrics:
    """All ``loraloop_*`` metrics of one :class:`~feedback.store.EventStore`.

    Nothing is registered on the global default registry; without a registry a private one is used.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.feedback = Counter(
            "loraloop_feedback",
            "Feedback events accepted (new ones only).",
            ["alias", "arm", "kind"],
            registry=r,
        )
        self.feedback_duplicates = Counter(
            "loraloop_feedback_duplicates", "Feedback retries answered idempotently.", registry=r
        )
        self.queue_depth = Gauge("loraloop_event_queue_depth", "Events waiting for the batch writer.", registry=r)
        self.flush_seconds = Histogram(
            "loraloop_event_flush_seconds",
            "Time to write and fsync one WAL batch.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.feedback_commit_seconds = Histogram(
            "loraloop_feedback_commit_seconds",
            "Time from write_feedback to its durable acknowledgement.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.written = Counter("loraloop_events_written", "Events written (fsynced) to the WAL.", ["table"], registry=r)
        self.rejected = Counter(
            "loraloop_events_rejected",
            "Events refused because the queue stayed full (policy `block`).",
            ["table"],
            registry=r,
        )
        self.spills = Counter(
            "loraloop_event_wal_spills",
            "Events written by the caller because the queue was full.",
            registry=r,
        )
        self.sealed = Counter(
            "loraloop_segments_sealed", "Parquet segments sealed from the WAL.", ["table"], registry=r
        )
        self.seal_seconds = Histogram(
            "loraloop_seal_seconds", "Time to seal one WAL file into Parquet segments.", registry=r
        )
        self.bad_lines = Counter(
            "loraloop_wal_bad_lines", "Unreadable WAL lines skipped while sealing (torn writes).", registry=r
        )
        self.write_errors = Counter(
            "loraloop_event_write_errors", "Failed WAL writes or seals (retried).", ["stage"], registry=r
        )

    def bind_queue(self, depth: Callable[[], float]) -> None:
        """Report the live queue depth on every scrape."""
        self.queue_depth.set_function(depth)
