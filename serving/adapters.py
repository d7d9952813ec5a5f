"""Adapters at runtime: which adapters exist, which alias points where, and keeping every back-end's
loaded set in step — atomically and without failing a request.

* Registering validates the directory (``adapter_checks``) before vLLM sees it, then loads the adapter
  on every healthy back-end (rolled back everywhere if one refuses).
* Repointing an alias loads the new adapter where it is missing, swaps the pointer (one assignment:
  requests already resolved keep the old adapter, new ones get the new one), then unloads the old
  adapter in the background once its in-flight requests have drained — unless something still uses it.
* A back-end that (re)joins gets every adapter in use before it takes traffic (a pool join hook).
* One lock per adapter name and one per alias serialise concurrent operations.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from core.settings import Settings

from .adapter_checks import AdapterRejected, BaseModelInfo, ValidatedAdapter, validate_adapter
from .backends import Backend, BackendPool
from .errors import OpenAIError
from .metrics import GatewayMetrics

logger = logging.getLogger(__name__)


class AdapterManager:
    """Owns registered adapters, alias pointers and what is loaded on each back-end."""

    def __init__(
        self,
        settings: Settings,
        pool: BackendPool,
        metrics: GatewayMetrics,
        base: BaseModelInfo | None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.metrics = metrics
        self.base = base
        self.root = settings.adapter_root.expanduser().resolve()
        self.state_path = settings.state_dir.expanduser() / "adapters.json"
        self.adapters: dict[str, ValidatedAdapter] = {}
        self.routes: dict[str, str | None] = {a: cfg.adapter for a, cfg in settings.aliases.items()}
        self.loaded: dict[str, set[str]] = {b.url: set() for b in pool.backends}
        self.in_flight: collections.Counter[str] = collections.Counter()
        self._drained = asyncio.Condition()
        self._adapter_locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._alias_locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._background: set[asyncio.Task[None]] = set()
        self._loading: set[str] = set()
        #: adapters used beyond alias pointers (experiment arms), supplied by the app
        self.extra_in_use: Callable[[], set[str]] = set
        #: called after every repoint with (alias, adapter, previous)
        self.on_change: list[Callable[[str, str | None, str | None], None]] = []
        headers = {}
        if settings.backends.api_key:
            headers["Authorization"] = f"Bearer {settings.backends.api_key.get_secret_value()}"
        self._headers = headers

    # --- start-up --------------------------------------------------------------------------------
    def load_initial(self) -> None:
        """Validate the configured adapters, then apply the persisted runtime state on top."""
        state = self._read_state()
        wanted = {name: str(cfg.path) for name, cfg in self.settings.adapters.items()}
        wanted.update(state.get("adapters", {}))
        for name, path in wanted.items():
            try:
                self.adapters[name] = self.validate(path)
            except AdapterRejected as exc:
                raise AdapterRejected(exc.code, f"adapter {name!r}: {exc}") from None
        for alias, adapter in state.get("aliases", {}).items():
            if alias in self.routes and (adapter is None or adapter in self.adapters):
                self.routes[alias] = adapter
        for alias, adapter in self.routes.items():
            self._publish_route(alias, None, adapter)

    def validate(self, path: str | Path) -> ValidatedAdapter:
        if self.base is None:
            raise AdapterRejected("base_mismatch", "the base model's config.json is not readable by the gateway")
        return validate_adapter(path, root=self.root, base=self.base, max_rank=self.settings.max_lora_rank)

    # --- the request path ------------------------------------------------------------------------
    def acquire(self, adapter: str | None) -> str | None:
        """Count a request on `adapter` as in flight until `release`."""
        if adapter is not None:
            self.in_flight[adapter] += 1
        return adapter

    def ready(self, adapter: str) -> bool:
        """Registered and loaded on every healthy back-end: safe to route to."""
        if adapter not in self.adapters:
            return False
        healthy = [b for b in self.pool.backends if b.healthy]
        return all(adapter in self.loaded.get(b.url, set()) for b in healthy)

    def load_soon(self, adapter: str) -> None:
        """Load a registered adapter everywhere in the background (an experiment another replica
        created names it); requests keep their default route until it is ready."""
        if adapter in self.adapters and adapter not in self._loading:
            self._loading.add(adapter)

            async def load() -> None:
                try:
                    async with self._adapter_locks[adapter]:
                        await self._load_everywhere(adapter)
                except OpenAIError as exc:
                    logger.warning("background load of %s failed: %s", adapter, exc.message)
                finally:
                    self._loading.discard(adapter)

            task = asyncio.create_task(load())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def release(self, adapter: str | None) -> None:
        if adapter is None:
            return
        self.in_flight[adapter] -= 1
        if self.in_flight[adapter] <= 0:
            del self.in_flight[adapter]
            task = asyncio.ensure_future(self._notify_drained())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _notify_drained(self) -> None:
        async with self._drained:
            self._drained.notify_all()

    def in_use(self) -> set[str]:
        """Adapters that aliases point to or running experiments use: what every back-end must have."""
        used = {a for a in self.routes.values() if a is not None}
        return used | (self.extra_in_use() & set(self.adapters))

    # --- back-end operations ---------------------------------------------------------------------
    async def _call(self, backend: Backend, op: str, name: str) -> None:
        body: dict[str, Any] = {"lora_name": name}
        if op == "load":
            body["lora_path"] = str(self.adapters[name].path)
        started = time.perf_counter()
        try:
            resp = await self.pool.client.post(
                f"{backend.url}/v1/{op}_lora_adapter", json=body, headers=self._headers, timeout=300.0
            )
            ok = resp.status_code == 200 or (op == "load" and "already been loaded" in resp.text)
            if op == "unload" and resp.status_code in (400, 404) and "not" in resp.text.lower():
                ok = True  # already gone (e.g. the back-end restarted)
            if not ok:
                detail = resp.text[:300].replace("\n", " ")
                raise RuntimeError(f"vLLM at {backend.url} refused to {op} {name!r}: HTTP {resp.status_code} {detail}")
        except (httpx.HTTPError, RuntimeError):
            self.metrics.adapter_ops.labels(op, "error").inc()
            raise
        finally:
            self.metrics.adapter_op_duration.labels(op).observe(time.perf_counter() - started)
        self.metrics.adapter_ops.labels(op, "ok").inc()
        loaded = self.loaded.setdefault(backend.url, set())
        (loaded.add if op == "load" else loaded.discard)(name)
        self.metrics.adapters_loaded.labels(backend.url).set(len(loaded))

    async def _load_everywhere(self, name: str) -> None:
        """Load on every healthy back-end that lacks it; undo the loads of this call on failure."""
        done: list[Backend] = []
        try:
            for backend in [b for b in self.pool.backends if b.healthy]:
                if name not in self.loaded.get(backend.url, set()):
                    await self._call(backend, "load", name)
                    done.append(backend)
        except (httpx.HTTPError, RuntimeError) as exc:
            for backend in done:
                try:
                    await self._call(backend, "unload", name)
                except (httpx.HTTPError, RuntimeError):
                    logger.warning("could not roll back %s on %s", name, backend.url)
            raise OpenAIError(502, str(exc), code="adapter_load_failed") from exc

    async def ensure_loaded(self, name: str) -> None:
        """Load a registered adapter on every healthy back-end that lacks it."""
        async with self._adapter_locks[name]:
            await self._load_everywhere(name)

    async def prepare_backend(self, backend: Backend) -> None:
        """Join hook: a (re)started back-end has nothing loaded; give it every adapter in use."""
        self.loaded[backend.url] = set()
        for name in sorted(self.in_use()):
            async with self._adapter_locks[name]:
                await self._call(backend, "load", name)

    # --- admin operations ------------------------------------------------------------------------
    async def register(self, name: str, path: str) -> ValidatedAdapter:
        adapter = await asyncio.to_thread(self.validate, path)
        async with self._adapter_locks[name]:
            known = self.adapters.get(name)
            if known is not None and known.path != adapter.path:
                raise OpenAIError(
                    409, f"adapter {name!r} is already registered from {known.path}; unload it first",
                    code="adapter_exists",
                )  # fmt: skip
            self.adapters[name] = adapter
            try:
                await self._load_everywhere(name)
            except OpenAIError:
                if known is None:
                    del self.adapters[name]
                raise
            self._write_state()
        logger.info("registered adapter %s from %s", name, adapter.path)
        return adapter

    async def unregister(self, name: str) -> None:
        if name not in self.adapters:
            raise OpenAIError(404, f"adapter {name!r} is not registered", code="adapter_not_found")
        users = sorted(a for a, target in self.routes.items() if target == name)
        if users:
            raise OpenAIError(409, f"adapter {name!r} still serves alias(es) {', '.join(users)}", code="adapter_in_use")
        await self._unload_when_drained(name)
        async with self._adapter_locks[name]:
            if name not in self.in_use():
                del self.adapters[name]
                self._write_state()

    async def point(self, alias: str, adapter: str | None) -> str | None:
        """Repoint `alias` to `adapter` (None = the base); returns the previous target."""
        if alias not in self.routes:
            raise OpenAIError(404, f"alias {alias!r} does not exist", code="model_not_found")
        if adapter is not None and adapter not in self.adapters:
            raise OpenAIError(404, f"adapter {adapter!r} is not registered", code="adapter_not_found")
        async with self._alias_locks[alias]:
            if adapter is not None:
                async with self._adapter_locks[adapter]:
                    await self._load_everywhere(adapter)
            previous = self.routes[alias]
            self.routes[alias] = adapter  # the switch: atomic for every request resolved after this line
            self._publish_route(alias, previous, adapter)
            self._write_state()
            for notify in self.on_change:
                notify(alias, adapter, previous)
        logger.info("alias %s now points to %s (was %s)", alias, adapter or "the base", previous or "the base")
        if previous is not None and previous != adapter and previous not in self.in_use():
            task = asyncio.create_task(self._unload_when_drained(previous))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return previous

    async def _unload_when_drained(self, name: str) -> None:
        async with self._drained:
            await self._drained.wait_for(lambda: self.in_flight[name] <= 0 or name in self.in_use())
        async with self._adapter_locks[name]:
            if name in self.in_use():
                return  # pointed to again meanwhile
            for backend in self.pool.backends:
                if name in self.loaded.get(backend.url, set()):
                    try:
                        await self._call(backend, "unload", name)
                    except (httpx.HTTPError, RuntimeError) as exc:
                        logger.warning("unloading %s: %s", name, exc)

    async def wait_background(self) -> None:
        """Let pending unloads finish (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # --- views and state -------------------------------------------------------------------------
    def _publish_route(self, alias: str, previous: str | None, adapter: str | None) -> None:
        if previous != adapter:
            with contextlib.suppress(KeyError):
                self.metrics.alias_adapter.remove(alias, previous or "base")
        self.metrics.alias_adapter.labels(alias, adapter or "base").set(1)

    async def backend_state(self) -> dict[str, list[str] | str]:
        """What each back-end really has loaded, asked from vLLM's /v1/models."""
        out: dict[str, list[str] | str] = {}
        for backend in self.pool.backends:
            try:
                resp = await self.pool.client.get(f"{backend.url}/v1/models", headers=self._headers, timeout=10)
                data = resp.json().get("data", [])
                out[backend.url] = sorted(m["id"] for m in data if m.get("parent"))
            except (httpx.HTTPError, ValueError) as exc:
                out[backend.url] = f"unreachable: {type(exc).__name__}"
        return out

    def _read_state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.state_path.read_text())
            return state
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise AdapterRejected("bad_config", f"cannot read {self.state_path}: {exc}") from None

    def _write_state(self) -> None:
        state = {"adapters": {n: str(a.path) for n, a in self.adapters.items()}, "aliases": self.routes}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.state_path.parent, prefix=".adapters-")
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)
