"""The write side of the event store: one :class:`EventStore` per writer process (gateway replica).

Request path → bounded in-memory queue → batch-writer thread → append-only WAL (group commit,
fsync) → sealer thread → immutable Parquet segments. Feedback skips the queue: it is appended by
the same group commit and :meth:`EventStore.write_feedback` returns only after the fsync.
See docs/event-store.md for the layout, the policies and the guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from core.errors import LoraloopError
from core.store_config import StoreConfig
from feedback.events import AdapterChangeEvent, AssignmentEvent, FeedbackEvent, RequestEvent
from feedback.fsutil import FileLock, fsync_dir, write_all
from feedback.metrics import StoreMetrics
from feedback.migrations import ensure_current, remove_temp_files
from feedback.segments import new_connection, seal_wal
from feedback.store_index import FeedbackIndex, RecentRequests
from feedback.wal import (
    TABLE_OF,
    WRITER_ID,
    Redacted,
    encode,
    encode_batch,
    encode_lenient,
    list_segments,
    list_wals,
    stamp_now,
    wal_name,
)

log = logging.getLogger(__name__)

_QUEUED_TYPES = (RequestEvent, AssignmentEvent, AdapterChangeEvent)


class StoreError(LoraloopError, RuntimeError):
    """The store cannot accept or persist an event right now (the gateway answers 503)."""


class EventStore:
    """Durable, append-only event log of one writer; see the module docs.

    ``writer_id`` names the directory this process owns (``<root>/<writer_id>``); two live processes
    with the same id are refused. ``registry`` receives the ``loraloop_*`` metrics.
    """

    def __init__(self, config: StoreConfig, writer_id: str, registry: CollectorRegistry | None = None) -> None:
        if not WRITER_ID.match(writer_id):
            raise ValueError(f"writer id {writer_id!r} must match {WRITER_ID.pattern}")
        self.config = config
        self.writer_id = writer_id
        self.root = Path(config.root)
        self.dir = self.root / writer_id
        self.metrics = StoreMetrics(registry)
        self._queue: deque[Any] = deque()
        self._queue_max = config.queue_size
        self._batch = config.batch_size
        self._wake = threading.Event()
        self._cond = threading.Condition()
        self._cycle_started = 0
        self._cycle_done = 0
        self._failed: dict[int, BaseException] = {}
        #: event-loop waiters of `wait_durable`: (cycle that makes them durable, loop, future)
        self._loop_waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._fb_pending: list[bytes] = []
        self._fb_index = FeedbackIndex()
        self._recent = RecentRequests(config.recent_requests)
        self._wal_lock = threading.Lock()
        self._wal_fd: int | None = None
        self._wal_seq = 0
        self._wal_rows = 0
        self._wal_size = 0
        self._wal_opened = 0.0
        self._dirty = False
        self._retry = b""
        self._seal_q: queue.Queue[int | None] = queue.Queue()
        self._seal_failed: list[int] = []
        self._stopping = False
        self._state = "new"
        self._state_lock = threading.Lock()
        self._dir_lock = FileLock(self.dir / "LOCK")
        self._writer: threading.Thread | None = None
        self._sealer: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Take this writer's directory, seal WALs left by a crash, start the writer threads."""
        with self._state_lock:
            if self._state == "running":
                return
            if self._state == "closed":
                raise StoreError("a closed EventStore cannot be restarted; create a new one")
            ensure_current(self.root)
            self.dir.mkdir(parents=True, exist_ok=True)
            if not self._dir_lock.acquire(blocking=False):
                raise StoreError(f"writer {self.writer_id!r} is already running on {self.root}")
            try:
                remove_temp_files(self.dir)
                self._recover()
                last = [w.seq for w in list_wals(self.root, self.writer_id)]
                last += [s.seq for s in list_segments(self.root, writer=self.writer_id)]
                self._fb_index.load(self.root, self.writer_id)
                self._open_wal(max(last, default=0) + 1)
            except BaseException:
                self._dir_lock.release()
                raise
            self.metrics.bind_queue(lambda: len(self._queue))
            self._writer = threading.Thread(target=self._run_writer, name=f"events-writer-{self.writer_id}")
            self._sealer = threading.Thread(target=self._run_sealer, name=f"events-sealer-{self.writer_id}")
            self._writer.daemon = self._sealer.daemon = True
            self._writer.start()
            self._sealer.start()
            self._state = "running"

    def _recover(self) -> None:
        wals = list_wals(self.root, self.writer_id)
        if not wals:
            return
        con = new_connection()
        try:
            for wal in wals:
                try:
                    counts, bad = seal_wal(
                        con,
                        wal.path,
                        self.writer_id,
                        wal.seq,
                        root=self.root,
                        compression=self.config.compression,
                        fsync=self.config.fsync,
                    )
                except Exception as exc:  # readers still read the WAL; a later start retries
                    log.error("cannot seal %s left by a previous process: %s", wal.path, exc)
                    self.metrics.write_errors.labels("seal").inc()
                    continue
                log.info("recovered %s: %s (%d torn lines skipped)", wal.path, counts, bad)
                self.metrics.bad_lines.inc(bad)
                for table in counts:
                    self.metrics.sealed.labels(table).inc()
        finally:
            con.close()

    def close(self) -> None:
        """Write everything still queued, seal the WAL, stop the threads, release the directory."""
        with self._state_lock:
            if self._state != "running":
                self._state = "closed"
                return
            self._state = "closing"
        self._stopping = True
        self._wake.set()
        assert self._writer is not None and self._sealer is not None
        self._writer.join()
        self._cycle()  # anything submitted while the writer was finishing
        with self._wal_lock:
            if self._wal_rows:
                self._rotate_locked(reopen=False)
            elif self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None
                os.unlink(self.dir / wal_name(self._wal_seq))
        for seq in self._seal_failed:
            self._seal_q.put(seq)
        self._seal_q.put(None)
        self._sealer.join()
        self._dir_lock.release()
        with self._state_lock:
            self._state = "closed"

    def __enter__(self) -> EventStore:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- request path ------------------------------------------------------------------------------

    def submit(self, event: RequestEvent | AssignmentEvent | AdapterChangeEvent, *, log_text: bool = True) -> None:
        """Queue an event for the batch writer; never waits for disk in the normal case.

        With ``log_text=False`` (the alias's privacy switch) the prompt, messages and completion
        are not stored (NULL, ``text_logged`` false). When the queue is full the configured
        ``full_queue_policy`` applies (see StoreConfig).
        """
        if self._state != "running":
            raise StoreError("the event store is not running")
        item: Any = event
        if type(event) is RequestEvent:
            self._recent.add(event)
            if not log_text:
                item = Redacted(event)
        elif not isinstance(event, _QUEUED_TYPES):
            raise TypeError(f"cannot submit {type(event).__name__}; feedback goes through write_feedback()")
        q = self._queue
        if len(q) >= self._queue_max:
            self._queue_full(item)
            return
        q.append(item)
        if len(q) >= self._batch and not self._wake.is_set():
            self._wake.set()

    def _queue_full(self, item: Any) -> None:
        table = "requests" if isinstance(item, Redacted) else TABLE_OF[type(item)]
        if self.config.full_queue_policy == "block":
            deadline = time.monotonic() + self.config.block_timeout_s
            self._wake.set()
            while len(self._queue) >= self.config.queue_size:
                if time.monotonic() >= deadline:
                    self.metrics.rejected.labels(table).inc()
                    log.warning("event queue full for %.3fs: %s event rejected", self.config.block_timeout_s, table)
                    return
                time.sleep(0.0005)
            self._queue.append(item)
            return
        try:
            line = self._encode_one(item, stamp_now())
        except Exception as exc:
            self._reject(item, f"cannot be serialised: {exc}")
            return
        with self._wal_lock:
            self._append_locked(line, 1)
        self.metrics.spills.inc()
        self.metrics.written.labels(table).inc()
        self._wake.set()

    # --- feedback ----------------------------------------------------------------------------------

    def served_choices(self, request_id: str) -> int | None:
        """How many choices a request this writer served recently returned (None when unknown here)."""
        return self._recent.choices(request_id)

    def served_tools(self, request_id: str) -> frozenset[str] | None:
        """The function names a request this writer served recently offered (None when unknown here)."""
        return self._recent.tools(request_id)

    def served_alias(self, request_id: str) -> str | None:
        """The alias of a request this writer served recently (None when unknown here)."""
        served = self._recent.get(request_id)
        return served[0] if served is not None else None

    def write_feedback(
        self, fb: FeedbackEvent, *, log_text: bool = True, alias: str | None = None, arm: str | None = None
    ) -> tuple[FeedbackEvent, bool]:
        """Store feedback durably (fsynced) before returning.

        Returns ``(stored, created)``; ``created`` is False when this ``feedback_id`` was already
        stored (an idempotent retry): ``stored`` is then the first version. The request need not be
        known: feedback for an unknown request id is accepted as pending and matched at read time.
        With ``log_text=False`` the text of corrections and comments is not stored.
        """
        if self._state != "running":
            raise StoreError("the event store is not running")
        t0 = time.perf_counter()
        served = self._recent.get(fb.request_id)
        extra: dict[str, Any] = {}
        if served is not None:
            extra = dict(zip(("alias", "experiment_id", "arm", "adapter"), served, strict=True))
        stored = fb
        if not log_text and fb.kind in ("correction", "comment"):
            stored = fb.model_copy(update={"value": None})
        line = self._encode_one(stored, stamp_now(), extra)
        with self._cond:
            previous = self._fb_index.get(fb.feedback_id)
            if previous is None:
                self._fb_index.reserve(stored, self._cycle_started + 1)
                self._fb_pending.append(line)
            target = self._fb_index.target(fb.feedback_id)
        self._wake.set()
        self._wait_cycle(target, fb.feedback_id if previous is None else None)
        if previous is not None:
            self.metrics.feedback_duplicates.inc()
            found = (
                previous
                if isinstance(previous, FeedbackEvent)
                else self._fb_index.lookup(self.root, self.dir, fb.feedback_id)
            )
            return found or fb, False
        labels = (alias or extra.get("alias") or "unknown", arm or extra.get("arm") or "none", fb.kind)
        self.metrics.feedback.labels(*labels).inc()
        self.metrics.feedback_commit_seconds.observe(time.perf_counter() - t0)
        return stored, True

    def _wait_cycle(self, target: int, owned_id: str | None) -> None:
        if target <= 0:
            return
        with self._cond:
            ok = self._cond.wait_for(lambda: self._cycle_done >= target, timeout=self.config.feedback_timeout_s)
            error = self._failed.get(target)
            if owned_id is not None and (error is not None):
                self._fb_index.forget(owned_id)
            elif owned_id is not None and ok:
                self._fb_index.done(owned_id)
        if not ok:
            raise StoreError(f"event store did not commit within {self.config.feedback_timeout_s}s")
        if error is not None:
            raise StoreError(f"event store write failed: {error}")

    def flush(self) -> None:
        """Return once everything submitted before the call is fsynced and visible to readers."""
        if self._state != "running":
            return
        with self._cond:
            target = self._cycle_started + 1
        self._wake.set()
        self._wait_cycle(target, None)

    async def wait_durable(self) -> None:
        """`flush` for an event loop: returns once everything submitted before the call is fsynced,
        without holding a thread while it waits (the writer thread wakes the loop)."""
        if self._state != "running":
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._cond:
            target = self._cycle_started + 1
            self._loop_waiters.append((target, loop, future))
        self._wake.set()
        try:
            await asyncio.wait_for(future, timeout=self.config.feedback_timeout_s)
        except TimeoutError:
            raise StoreError(f"event store did not commit within {self.config.feedback_timeout_s}s") from None
        error = self._failed.get(target)
        if error is not None:
            raise StoreError(f"event store write failed: {error}")

    def _wake_loop_waiters_locked(self, done: int) -> None:
        if not self._loop_waiters:
            return
        ready: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        pending = []
        for target, loop, future in self._loop_waiters:
            if target <= done:
                ready.setdefault(loop, []).append(future)
            else:
                pending.append((target, loop, future))
        self._loop_waiters = pending
        for loop, futures in ready.items():  # one wake-up per loop, however many waiters
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_resolve_all, futures)

    def seal(self) -> None:
        """Flush, then seal the current WAL into Parquet now and wait for it (tests, shutdown hooks)."""
        if self._state != "running":
            return
        self.flush()
        with self._wal_lock:
            if self._wal_rows:
                self._rotate_locked(reopen=True)
        self._seal_q.join()

    # --- writer thread -----------------------------------------------------------------------------

    def _run_writer(self) -> None:
        interval = self.config.flush_interval_s
        while True:
            self._wake.wait(interval)
            self._wake.clear()
            stopping = self._stopping
            try:
                self._cycle()
                self._maybe_rotate()
            except Exception as exc:  # keep the writer alive; waiters time out or see the failure
                log.exception("event writer cycle failed: %s", exc)
                self.metrics.write_errors.labels("writer").inc()
            if stopping:
                return

    def _cycle(self) -> None:
        with self._cond:
            self._cycle_started += 1
            cycle = self._cycle_started
            fb_lines = self._fb_pending
            self._fb_pending = []
        q = self._queue
        items = [q.popleft() for _ in range(len(q))]
        payload = self._encode(items) if items else b""
        error: BaseException | None = None
        t0 = time.perf_counter()
        with self._wal_lock:
            data = self._retry + payload
            rows = len(items) + len(fb_lines) + (self._retry.count(b"\n") if self._retry else 0)
            try:
                self._append_locked(data + b"".join(fb_lines), rows)
                if self._dirty and self.config.fsync and self._wal_fd is not None:
                    os.fsync(self._wal_fd)
                self._dirty = False
                self._retry = b""
            except OSError as exc:
                error = exc
                self._retry = data  # request events are retried; feedback callers get an error
                self._recover_write_error_locked()
        if error is not None:
            log.error("WAL write failed (%s); %d events kept for retry", error, len(items))
            self.metrics.write_errors.labels("wal").inc()
        else:
            if items or fb_lines:
                self.metrics.flush_seconds.observe(time.perf_counter() - t0)
            if items:
                for cls, n in Counter(map(type, items)).items():
                    table = "requests" if cls is Redacted else TABLE_OF[cls]
                    self.metrics.written.labels(table).inc(n)
            if fb_lines:
                self.metrics.written.labels("feedback").inc(len(fb_lines))
        with self._cond:
            self._cycle_done = cycle
            if error is not None:
                self._failed[cycle] = error
                for old in [c for c in self._failed if c < cycle - 1000]:
                    del self._failed[old]
            self._cond.notify_all()
            self._wake_loop_waiters_locked(cycle)

    def _encode(self, items: list[Any]) -> bytes:
        stamp = stamp_now()
        try:
            return encode_batch(items, stamp)
        except Exception:  # one unserialisable event must not take the batch (or the thread) down
            parts = []
            for item in items:
                parts.append(self._encode_one(item, stamp))
            return b"".join(parts)

    def _encode_one(self, item: Any, stamp: bytes, extra: dict[str, Any] | None = None) -> bytes:
        try:
            return encode(item, stamp, extra)
        except Exception as exc:
            log.warning("event stored with lenient JSON (unserialisable parts replaced): %s", exc)
            return encode_lenient(item, stamp, extra)

    def _reject(self, item: Any, why: str) -> None:
        table = "requests" if isinstance(item, Redacted) else TABLE_OF.get(type(item), "unknown")
        self.metrics.rejected.labels(table).inc()
        log.error("%s event rejected: %s", table, why)

    def _append_locked(self, data: bytes, rows: int) -> None:
        if not data:
            return
        if self._wal_fd is None:
            raise StoreError("the WAL is closed")
        write_all(self._wal_fd, data)
        self._wal_size += len(data)
        self._wal_rows += rows
        self._dirty = True

    def _recover_write_error_locked(self) -> None:
        """After a failed write: cut the WAL back to its last good size and move on to a new file."""
        good = self._wal_size
        try:
            if self._wal_fd is not None:
                os.ftruncate(self._wal_fd, good)
                self._rotate_locked(reopen=True)
        except OSError as exc:
            log.error("cannot recover the WAL after a write error: %s", exc)

    def _open_wal(self, seq: int) -> None:
        path = self.dir / wal_name(seq)
        self._wal_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if self.config.fsync:
            fsync_dir(self.dir)
        self._wal_seq = seq
        self._wal_rows = 0
        self._wal_size = 0
        self._wal_opened = time.monotonic()

    def _maybe_rotate(self) -> None:
        with self._wal_lock:
            if not self._wal_rows:
                self._wal_opened = time.monotonic()
                return
            age = time.monotonic() - self._wal_opened
            if self._wal_rows >= self.config.seal_rows or age >= self.config.seal_every_s:
                self._rotate_locked(reopen=True)

    def _rotate_locked(self, *, reopen: bool) -> None:
        assert self._wal_fd is not None
        if self._dirty and self.config.fsync:
            os.fsync(self._wal_fd)
        self._dirty = False
        os.close(self._wal_fd)
        self._wal_fd = None
        sealed = self._wal_seq
        if reopen:
            self._open_wal(sealed + 1)
        self._seal_q.put(sealed)

    # --- sealer thread -----------------------------------------------------------------------------

    def _run_sealer(self) -> None:
        con = new_connection(threads=1)
        try:
            while True:
                seq = self._seal_q.get()
                try:
                    if seq is None:
                        return
                    self._seal_one(con, seq)
                finally:
                    self._seal_q.task_done()
        finally:
            con.close()

    def _seal_one(self, con: Any, seq: int) -> None:
        path = self.dir / wal_name(seq)
        t0 = time.perf_counter()
        try:
            counts, bad = seal_wal(
                con,
                path,
                self.writer_id,
                seq,
                root=self.root,
                compression=self.config.compression,
                fsync=self.config.fsync,
            )
        except Exception as exc:  # the WAL stays; retried at close or by the next start
            log.error("sealing %s failed: %s", path, exc)
            self.metrics.write_errors.labels("seal").inc()
            self._seal_failed.append(seq)
            return
        self.metrics.seal_seconds.observe(time.perf_counter() - t0)
        self.metrics.bad_lines.inc(bad)
        for table in counts:
            self.metrics.sealed.labels(table).inc()


def _resolve_all(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)
