"""Settings of the event store (`store:` of the one Settings object, core/settings.py; read by feedback/)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core import paths


class StoreConfig(BaseModel):
    """Where and how request, feedback and control events are stored (see docs/event-store.md)."""

    model_config = ConfigDict(extra="forbid")

    root: Path = Field(
        default=paths.EVENTS_ROOT,
        description="Store root. Every writer (gateway replica) owns `<root>/<writer_id>/`; readers glob "
        "`<root>/*/`. Put it on a local or shared POSIX file system that every process can reach.",
    )
    queue_size: int = Field(
        default=10_000,
        ge=1,
        description="Bound of the in-memory queue between the request path and the batch writer.",
    )
    batch_size: int = Field(
        default=2_000, ge=1, description="The batch writer wakes up as soon as this many events are queued."
    )
    flush_interval_s: float = Field(
        default=0.1,
        gt=0,
        description="Longest time a queued event waits before it is written and fsynced to the WAL.",
    )
    seal_every_s: float = Field(
        default=300.0,
        gt=0,
        description="A non-empty WAL is sealed into Parquet segments at least this often.",
    )
    seal_rows: int = Field(default=100_000, ge=1, description="A WAL is sealed as soon as it holds this many events.")
    full_queue_policy: Literal["spill", "block"] = Field(
        default="spill",
        description="When the queue is full: `spill` writes the event to the WAL in the caller's thread "
        "(never dropped, counted in loraloop_event_wal_spills_total); `block` waits up to "
        "`block_timeout_s` for room, then rejects the event (counted in loraloop_events_rejected_total "
        "and logged).",
    )
    block_timeout_s: float = Field(
        default=0.05, ge=0, description="Longest wait for queue room under the `block` policy."
    )
    feedback_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest time write_feedback waits for its fsync before raising StoreError.",
    )
    fsync: bool = Field(
        default=True,
        description="fsync WAL commits, segments and directories. Only benchmarks may turn this off.",
    )
    compression: Literal["zstd", "snappy", "gzip", "uncompressed"] = Field(
        default="zstd", description="Parquet compression of sealed segments."
    )
    recent_requests: int = Field(
        default=100_000,
        ge=0,
        description="How many recent request ids (with alias/experiment/arm) a writer remembers, so that "
        "feedback is labelled with its arm when it is written (the rest are resolved when sealing or "
        "reading).",
    )
    experiments_refresh_s: float = Field(
        default=2.0, gt=0, description="How stale a gateway's cached view of the experiments may become."
    )
    enabled: bool = Field(
        default=True,
        description="Log requests, assignments and feedback. Off: a pure serving gateway — nothing is "
        "written and POST /v1/feedback answers 503.",
    )
    durable_requests: bool = Field(
        default=True,
        description="Make each request event durable (group-committed fsync) before the response's last byte "
        "(the final `[DONE]` of a stream), so a request a client saw complete is never lost to a crash. "
        "Off: request events are written within flush_interval_s, after the response.",
    )
    export_lag_s: float = Field(
        default=30.0,
        ge=0,
        description="Training-data export stops this many seconds before now, so that events still in "
        "flight (or stamped by a machine whose clock is a little behind) are not skipped by the watermark.",
    )

    @model_validator(mode="after")
    def _batch_fits_queue(self) -> StoreConfig:
        if self.batch_size > self.queue_size:
            raise ValueError("batch_size must not exceed queue_size")
        return self
