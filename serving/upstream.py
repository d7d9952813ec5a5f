"""The data plane's HTTP client to vLLM: forwarded completions and their SSE streams.

An HTTP/1.1 client on asyncio protocols with llhttp (httptools, the parser uvicorn uses) rather than
a general-purpose client. Its only peer is a vLLM OpenAI server, its only request a JSON POST, so
each request is one pre-rendered head plus the body, written in the calling task. That matters in a
burst: aiohttp (on Python < 3.12) writes a request body from a task of its own, which runs only after
every other request already waiting in the event loop has been taken in, so the first request of a
burst reached vLLM last; and a general client's per-request bookkeeping (header multidicts, cookie
jars, tracing hooks) was a third of the gateway's intake (bench/gateway_cpu.py, bench/serving_load.py).

Streams are handled as bytes: events are split on the blank line and handed on without decoding.
The control plane (health checks, adapter loads) stays on httpx, where requests are rare."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

from core.errors import LoraloopError

#: a reader that falls this far behind stops reading from vLLM until it catches up
_HIGH_WATER = 1 << 20


class UpstreamError(LoraloopError):
    """The back-end failed; ``kind`` says how: `connect` (nothing was sent: try another back-end),
    `timeout`, or `failed`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class UpstreamTimeouts:
    connect_s: float
    read_s: float  # the longest silence between two reads
    keepalive_s: float = 4.0  # idle connections kept this long (below the server's own keep-alive)
    max_connections: int = 2000  # per back-end; beyond this many requests in flight, new ones wait


class _Dropped(Exception):
    """A kept-alive connection closed before any byte of the response: safe to send again."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the response it is receiving (one at a time, no pipelining)."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        # silence detection (see `wait`)
        self.timer: asyncio.TimerHandle | None = None
        self.watched: asyncio.Future[None] | None = None
        self.read_s = 0.0
        self.wait_start = self.last_data = 0.0
        self._new_exchange()

    def _new_exchange(self) -> None:
        self.status = 0
        self.head: asyncio.Future[None] = self.loop.create_future()
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.framed = False  # content-length or chunked: the end of the body is known
        self.got_bytes = False
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.release_on_end = False  # the reader is done: back to the pool when the message ends

    # --- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.last_data = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("failed", f"malformed HTTP from the back-end: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.complete:
            return
        if self.head.done() and not self.framed:  # a body delimited by the end of the connection
            self.complete = True
            self._wake()
        elif not self.got_bytes and not self.head.done():
            self._fail(_Dropped(f"the back-end closed the connection: {exc or 'EOF'}"))
        else:
            self._fail(UpstreamError("failed", f"the back-end closed the connection mid-response: {exc or 'EOF'}"))

    # --- llhttp callbacks ------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        if self.release_on_end:
            self.pool.give_back(self)
        else:
            self._wake()

    # --- helpers ---------------------------------------------------------------------------------
    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved: no "never retrieved" warning when nobody waits
        elif isinstance(error, UpstreamError) and self.error is None:
            self.error = error
            self._wake()

    def take(self) -> bytes:
        data = b"".join(self.chunks) if len(self.chunks) > 1 else (self.chunks[0] if self.chunks else b"")
        self.chunks, self.buffered = [], 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    async def wait(self, future: asyncio.Future[None], read_s: float) -> None:
        """Await `future` (headers, or more body) for at most `read_s` of silence from the back-end.

        One lazily re-armed timer per connection rather than one per wait: a stream waits once per
        token."""
        self.watched, self.read_s, self.wait_start = future, read_s, self.loop.time()
        if self.timer is None:
            self.timer = self.loop.call_at(self.wait_start + read_s, self._check_silence)
        try:
            await future
        finally:
            self.watched = None

    def _check_silence(self) -> None:
        self.timer = None
        future = self.watched
        if future is None or future.done():
            return  # nobody waits now: the next wait arms the timer again
        due = max(self.last_data, self.wait_start) + self.read_s
        if self.loop.time() >= due:
            future.set_exception(UpstreamError("timeout", f"no data from the back-end within {self.read_s:g} s"))
        else:
            self.timer = self.loop.call_at(due, self._check_silence)

    async def more(self, read_s: float) -> None:
        self.waiter = self.loop.create_future()
        try:
            await self.wait(self.waiter, read_s)
        finally:
            self.waiter = None

    def abort(self) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.abort()


class _Pool:
    """Keep-alive connections to one back-end (scheme, host, port)."""

    def __init__(self, scheme: str, host: str, port: int, timeouts: UpstreamTimeouts) -> None:
        self.loop = asyncio.get_running_loop()
        self.host, self.port, self.timeouts = host, port, timeouts
        self.ssl = ssl.create_default_context() if scheme == "https" else None
        self.idle: list[_Connection] = []
        self.open: set[_Connection] = set()
        self.waiting: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> tuple[_Connection, bool]:
        """A connection, and whether it was kept alive from an earlier request."""
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()  # the most recently used: the least likely to be closing
            if conn.closed or now - conn.idle_since > self.timeouts.keepalive_s:
                conn.abort()
                continue
            return conn, True
        while len(self.open) >= self.timeouts.max_connections:
            waiter = self.loop.create_future()
            self.waiting.append(waiter)
            await waiter  # a connection was forgotten or went idle
            if self.idle:
                return await self.acquire()
        return await self.connect(), False

    async def connect(self) -> _Connection:
        conn = _Connection(self)
        self.open.add(conn)
        try:
            transport, _ = await asyncio.wait_for(
                self.loop.create_connection(lambda: conn, self.host, self.port, ssl=self.ssl),
                self.timeouts.connect_s,
            )
        except TimeoutError:
            self.forget(conn)
            raise UpstreamError("connect", f"connecting timed out after {self.timeouts.connect_s:g} s") from None
        except OSError as exc:
            self.forget(conn)
            raise UpstreamError("connect", f"{type(exc).__name__}: {exc}") from exc
        conn.transport = transport  # uvloop may call connection_made only after this returns
        return conn

    def give_back(self, conn: _Connection) -> None:
        if conn.closed or not conn.keep_alive:
            conn.abort()
            return
        conn._new_exchange()
        conn.idle_since = time.monotonic()
        self.idle.append(conn)
        self._wake_one()

    def forget(self, conn: _Connection) -> None:
        self.open.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        self._wake_one()

    def _wake_one(self) -> None:
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for conn in list(self.open):
            conn.abort()
        self.idle.clear()


class UpstreamResponse:
    """A response whose body has not been read yet; close it (or read it whole) exactly once."""

    def __init__(self, conn: _Connection, read_s: float) -> None:
        self._conn = conn
        self._read_s = read_s
        self.status = conn.status

    async def read(self) -> bytes:
        conn, parts = self._conn, []
        try:
            while True:
                if conn.chunks:  # taken as it comes: a large body must not stop the reading
                    parts.append(conn.take())
                elif conn.complete:
                    return b"".join(parts)
                elif conn.error is not None:
                    raise conn.error
                else:
                    await conn.more(self._read_s)
        finally:
            self.release()

    async def events(self) -> AsyncIterator[list[bytes]]:
        """The `data` payloads of the SSE stream, as bytes, in batches: all complete events of one
        read from the socket, so what arrived together is also sent on together."""
        conn, buffer = self._conn, b""
        while True:
            if conn.chunks:
                data = conn.take()
                buffer = buffer + data if buffer else data
                if b"\r" in buffer:  # CRLF line ends (vLLM sends LF): normalised; a lone trailing CR waits
                    buffer = buffer.replace(b"\r\n", b"\n")
                if b"\n\n" in buffer:
                    *complete, buffer = buffer.split(b"\n\n")
                    batch = [p for p in map(_data_of, complete) if p is not None]
                    if batch:
                        yield batch
                continue
            if conn.complete:
                break
            if conn.error is not None:
                raise conn.error
            await conn.more(self._read_s)
        rest = [p for p in map(_data_of, buffer.split(b"\n\n")) if p is not None]
        if rest:
            yield rest

    def release(self) -> None:
        """Done with a fully read response: its connection goes back to the pool."""
        conn = self._conn
        if conn.complete:
            conn.pool.give_back(conn)
        else:
            conn.abort()

    def release_at_end(self) -> None:
        """Done with a stream whose last event has been read: the connection goes back to the pool
        once the HTTP message has ended too (at once if it has; vLLM ends it right after `[DONE]`)."""
        conn = self._conn
        if conn.complete or conn.closed or conn.error is not None:
            self.release()
        else:
            conn.release_on_end = True

    def close(self) -> None:
        """Drop the connection (a stream cut short: vLLM aborts the request when it notices)."""
        self._conn.abort()


def _data_of(event: bytes) -> bytes | None:
    """The data of one SSE event (its `data:` lines joined), None for comments and empty events."""
    event = event.strip(b"\n")
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


class UpstreamClient:
    """Posts JSON requests to vLLM servers over pooled keep-alive connections (one per request in
    flight). Pools are created on first use, inside the event loop that serves (nothing at import or
    build time), and closed by `aclose`."""

    def __init__(self, timeouts: UpstreamTimeouts, headers: dict[str, str] | None = None) -> None:
        self.timeouts = timeouts
        # no Accept-Encoding: token streams are passed on as they come, uncompressed
        extra = {"Content-Type": "application/json", **(headers or {})}
        self._headers = "".join(f"{k}: {v}\r\n" for k, v in extra.items()).encode("latin-1")
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._targets: dict[str, tuple[_Pool, bytes]] = {}

    def _target(self, url: str) -> tuple[_Pool, bytes]:
        """The pool for the URL's back-end and the request head up to Content-Length (cached per URL)."""
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UpstreamError("connect", f"not an http(s) URL: {url}")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            key = (parts.scheme, parts.hostname, port)
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools[key] = _Pool(*key, self.timeouts)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            head = f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n".encode("latin-1") + self._headers
            target = self._targets[url] = (pool, head)
        return target

    async def post(self, url: str, body: bytes) -> UpstreamResponse:
        """Send one request and return once the response's status line and headers are in.

        The request is written before the first suspension point (on a kept-alive connection), so
        a burst reaches vLLM in arrival order."""
        pool, head = self._target(url)
        request = head + b"Content-Length: %d\r\n\r\n" % len(body)
        for attempt in (1, 2):
            conn, reused = await pool.acquire()
            assert conn.transport is not None
            if len(body) < 65536:
                conn.transport.write(request + body)
            else:
                conn.transport.writelines((request, body))
            try:
                await conn.wait(conn.head, self.timeouts.read_s)
            except _Dropped as exc:
                conn.abort()
                # a pooled keep-alive connection the server had just closed: retry once, fresh
                if attempt == 2 or not reused:
                    raise UpstreamError("connect", str(exc)) from None
                continue
            except BaseException:  # timed out, failed, or our caller was cancelled: drop it
                conn.abort()
                raise
            return UpstreamResponse(conn, self.timeouts.read_s)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._targets.clear()
