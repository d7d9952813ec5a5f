"""The data plane's HTTP client to vLLM: forwarded completions and their SSE streams.

It is aiohttp rather than httpx on purpose: a token stream passes through here once per token per
request, and aiohttp's C HTTP parser and connection pool cost a fraction of httpx/h11's pure-Python
path (measured with bench/gateway_cpu.py). Streams are handled as bytes: events are split on the
blank line and handed on without decoding. The control plane (health checks, adapter loads) stays
on httpx, where requests are rare."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp


class UpstreamError(Exception):
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


class UpstreamResponse:
    """A response whose body has not been read yet; close it (or read it whole) exactly once."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _mid_response(exc) from exc
        finally:
            self._resp.release()

    async def events(self) -> AsyncIterator[list[bytes]]:
        """The `data` payloads of the SSE stream, as bytes, in batches: all complete events of one
        read from the socket, so what arrived together is also sent on together."""
        buffer = b""
        try:
            async for data in self._resp.content.iter_any():
                buffer = buffer + data if buffer else data
                if b"\r" in buffer:  # CRLF line ends (vLLM sends LF): normalised; a lone trailing CR waits
                    buffer = buffer.replace(b"\r\n", b"\n")
                if b"\n\n" not in buffer:
                    continue
                *complete, buffer = buffer.split(b"\n\n")
                batch = [p for p in map(_data_of, complete) if p is not None]
                if batch:
                    yield batch
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _mid_response(exc) from exc
        rest = [p for p in map(_data_of, buffer.split(b"\n\n")) if p is not None]
        if rest:
            yield rest

    def release(self) -> None:
        """Done with a fully read response: its connection goes back to the pool."""
        self._resp.release()

    def close(self) -> None:
        """Drop the connection (a stream cut short: vLLM aborts the request when it notices)."""
        self._resp.close()


def _data_of(event: bytes) -> bytes | None:
    """The data of one SSE event (its `data:` lines joined), None for comments and empty events."""
    event = event.strip(b"\n")
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _mid_response(exc: BaseException) -> UpstreamError:
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamError("timeout", "no data from the back-end within the read timeout")
    return UpstreamError("failed", f"{type(exc).__name__}: {exc}".rstrip(": "))


class UpstreamClient:
    """Posts requests to vLLM servers over a pooled keep-alive connection per in-flight request.

    The session is created on first use, inside the event loop that serves (nothing at import or
    build time), and closed by `aclose`."""

    def __init__(self, timeouts: UpstreamTimeouts, headers: dict[str, str] | None = None) -> None:
        self.timeouts = timeouts
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=2000,  # beyond this many requests in flight, new ones wait for a connection
                keepalive_timeout=self.timeouts.keepalive_s,
                enable_cleanup_closed=False,
            )
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=self.timeouts.connect_s, sock_read=self.timeouts.read_s
            )
            # no Accept-Encoding: token streams are passed on as they come, uncompressed
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=timeout, skip_auto_headers=("User-Agent", "Accept-Encoding")
            )
        return self._session

    async def post(self, url: str, body: bytes) -> UpstreamResponse:
        """Send one request and return once the response's status line and headers are in."""
        session = self._get_session()
        for attempt in (1, 2):
            try:
                resp = await session.post(url, data=body, headers=self.headers)
                return UpstreamResponse(resp)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # a pooled keep-alive connection the server had just closed: retry once, fresh
                if attempt == 2 or isinstance(exc, aiohttp.ClientConnectorError):
                    raise UpstreamError("connect", f"{type(exc).__name__}: {exc}") from exc
            except aiohttp.ConnectionTimeoutError as exc:
                raise UpstreamError("connect", f"connecting timed out after {self.timeouts.connect_s} s") from exc
            except TimeoutError as exc:
                raise UpstreamError("timeout", "the back-end did not answer within the timeout") from exc
            except aiohttp.ClientError as exc:
                raise UpstreamError("failed", f"{type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
