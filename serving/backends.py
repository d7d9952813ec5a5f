"""The pool of vLLM OpenAI servers behind the gateway: health checks, load balancing, and the hook
that prepares a back-end (loads its adapters) before it takes traffic."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from .errors import OpenAIError
from .metrics import GatewayMetrics

logger = logging.getLogger(__name__)

#: Called with a back-end that just passed its health check, before it is put in rotation.
JoinHook = Callable[["Backend"], Awaitable[None]]


@dataclass
class Backend:
    """One vLLM OpenAI server."""

    url: str
    healthy: bool = False
    in_flight: int = 0
    last_error: str | None = None
    last_change: float = field(default_factory=time.monotonic)
    #: Set by the managed runner while the process is (re)starting, so health checks do not race it.
    starting: bool = False
    #: Health checks in a row that timed out while it was in rotation.
    missed_checks: int = 0

    def state(self) -> dict[str, object]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "starting": self.starting,
            "in_flight": self.in_flight,
            "last_error": self.last_error,
            "missed_checks": self.missed_checks,
        }


class BackendPool:
    """Health-checked back-ends; picks the healthy one with the fewest requests in flight.

    A back-end leaves the rotation when `/health` answers anything but 200 or the connection fails
    (refused, reset), or when `unhealthy_after` checks in a row time out: a vLLM server busy with a burst can be slow to
    accept a connection, and taking the only back-end out for that would turn a slow moment into
    503s for everyone (a failed forward still takes it out at once: see OpenAIServing._send)."""

    def __init__(
        self,
        urls: list[str],
        client: httpx.AsyncClient,
        metrics: GatewayMetrics,
        *,
        health_interval_s: float = 5.0,
        health_timeout_s: float = 3.0,
        unhealthy_after: int = 3,
    ) -> None:
        self.backends = [Backend(url) for url in urls]
        self.client = client
        self.metrics = metrics
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.unhealthy_after = unhealthy_after
        self._join_hooks: list[JoinHook] = []
        self._rr = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._checks: dict[str, asyncio.Lock] = {b.url: asyncio.Lock() for b in self.backends}
        for b in self.backends:
            metrics.backend_up.labels(b.url).set(0)

    def add_join_hook(self, hook: JoinHook) -> None:
        self._join_hooks.append(hook)

    # --- selection -------------------------------------------------------------------------------
    def pick(self, exclude: set[str] | frozenset[str] = frozenset()) -> Backend:
        """The healthy back-end with the fewest requests in flight (round-robin among equals)."""
        candidates = [b for b in self.backends if b.healthy and b.url not in exclude]
        if not candidates:
            raise OpenAIError(503, self.unavailable_message(), code="backend_unavailable")
        start = next(self._rr) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        return min(rotated, key=lambda b: b.in_flight)

    def unavailable_message(self) -> str:
        states = ", ".join(f"{b.url} ({'starting' if b.starting else b.last_error or 'down'})" for b in self.backends)
        return f"no healthy vLLM back-end is available: {states}"

    @property
    def any_healthy(self) -> bool:
        return any(b.healthy for b in self.backends)

    # --- health ----------------------------------------------------------------------------------
    def mark_down(self, backend: Backend, reason: str) -> None:
        backend.missed_checks = 0
        if backend.healthy:
            logger.warning("back-end %s is down: %s", backend.url, reason)
            backend.last_change = time.monotonic()
        backend.healthy = False
        backend.last_error = reason
        self.metrics.backend_up.labels(backend.url).set(0)

    async def check(self, backend: Backend) -> bool:
        """Probe /health; on a down→up transition run the join hooks before taking traffic."""
        async with self._checks[backend.url]:
            timed_out = False
            try:
                resp = await self.client.get(f"{backend.url}/health", timeout=self.health_timeout_s)
                ok = resp.status_code == 200
                reason = None if ok else f"/health answered {resp.status_code}"
            except httpx.HTTPError as exc:
                ok, reason = False, f"{type(exc).__name__}: {exc}".rstrip(": ")
                timed_out = isinstance(exc, httpx.TimeoutException)
            if not ok:
                if timed_out and backend.healthy:
                    backend.missed_checks += 1
                    if backend.missed_checks < self.unhealthy_after:
                        logger.warning("back-end %s missed a health check (%d in a row, out at %d): %s",
                                       backend.url, backend.missed_checks, self.unhealthy_after, reason)  # fmt: skip
                        return True  # still in rotation
                    reason = f"{reason} ({backend.missed_checks} health checks in a row)"
                self.mark_down(backend, reason or "unhealthy")
                return False
            backend.missed_checks = 0
            if backend.healthy:
                return True
            try:
                for hook in self._join_hooks:
                    await hook(backend)
            except Exception as exc:  # a failed hook keeps the back-end out of rotation
                logger.warning("back-end %s is up but could not be prepared: %s", backend.url, exc)
                self.mark_down(backend, f"preparation failed: {exc}")
                return False
            backend.healthy, backend.last_error = True, None
            backend.last_change = time.monotonic()
            self.metrics.backend_up.labels(backend.url).set(1)
            logger.info("back-end %s is healthy and in rotation", backend.url)
            return True

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(b) for b in self.backends if not b.starting))

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:  # never let the loop die
                logger.exception("health check round failed")
            await asyncio.sleep(self.health_interval_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._health_loop(), name="backend-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
