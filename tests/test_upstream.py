"""The data-plane client (serving/upstream.py) against raw loopback servers that send exactly the bytes
a test wants: SSE events split anywhere across reads, CRLF, comments, multi-line data, a server that
drops a kept-alive connection, one that never answers, one that is not there."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from serving import upstream
from serving.upstream import UpstreamClient, UpstreamError, UpstreamTimeouts

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
    return await reader.readexactly(length)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


def kept_alive(respond: Callable[[asyncio.StreamWriter], Awaitable[None]], connections: list[int]) -> Handler:
    """A handler that answers every request of a kept-alive connection with `respond`, and notes
    each connection it is given in `connections`."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        while True:
            try:
                await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            await respond(writer)

    return handler


async def ok(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    await writer.drain()


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Wait for `condition` (polled on the event loop) instead of a fixed sleep: a loaded machine may need
    far longer than usual, and a fixed window would pass or fail by luck."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        await asyncio.sleep(0.005)


class FakeClock:
    """`time.monotonic` for serving.upstream only, moved on by hand: the keep-alive expiry is tested by
    stepping over the limit, not by sleeping past it (the event loop keeps its own clock)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient(UpstreamTimeouts(connect_s=2, read_s=1), headers={"Authorization": "Bearer k"})
    yield c
    await c.aclose()


async def collect(client: UpstreamClient, url: str) -> list[bytes]:
    resp = await client.post(f"{url}/v1/completions", b"{}")
    assert resp.status == 200
    out = [payload async for batch in resp.events() for payload in batch]
    resp.release()
    return out


async def first_event_then_error(client: UpstreamClient, url: str, kind: str) -> None:
    """The stream gives its first event (`1`), then the next read fails with an error of `kind`."""
    resp = await client.post(url, b"{}")
    batches = resp.events()
    assert await anext(batches) == [b"1"]
    with pytest.raises(UpstreamError) as exc:
        await anext(batches)
    assert exc.value.kind == kind
    resp.close()


async def test_events_split_anywhere_across_reads(client: UpstreamClient) -> None:
    stream = (
        b'data: {"a":1}\n\n'
        b": a comment line\n\n"
        b'data: {"b":\n'
        b"data: 2}\n\n"  # one event, two data lines
        b'data:{"c":3}\r\n\r\n'  # CRLF, no space after the colon
        b"data: [DONE]\n\n"
    )

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(HEAD)
        for i in range(len(stream)):  # one byte per HTTP chunk, flushed one by one
            writer.write(chunk(stream[i : i + 1]))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server, url = await serve(handler)
    async with server:
        assert await collect(client, url) == [b'{"a":1}', b'{"b":\n2}', b'{"c":3}', b"[DONE]"]


async def test_events_that_arrive_together_come_as_one_batch(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(HEAD + chunk(b"data: 1\n\ndata: 2\n\ndata: 3\n\ndata: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server, url = await serve(handler)
    async with server:
        resp = await client.post(f"{url}/v1/completions", b"{}")
        assert [batch async for batch in resp.events()] == [[b"1", b"2", b"3", b"[DONE]"]]
        resp.release()


async def test_request_is_sent_as_given(client: UpstreamClient) -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
        seen.append(await reader.readexactly(length))
        body = b'{"ok":true}'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server, url = await serve(handler)
    async with server:
        resp = await client.post(f"{url}/v1/chat/completions", b'{"model":"m"}')
        assert await resp.read() == b'{"ok":true}'
    head = seen[0].lower()
    assert head.startswith(b"post /v1/chat/completions http/1.1")
    assert b"authorization: bearer k" in head and b"content-type: application/json" in head
    assert b"accept-encoding" not in head  # streams are passed on uncompressed
    assert seen[1] == b'{"model":"m"}'


async def test_a_dropped_keepalive_connection_is_retried_once(client: UpstreamClient) -> None:
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        while True:
            try:
                await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            served += 1
            if served == 2:  # the second request: the server closes the kept-alive socket instead
                writer.transport.abort()
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    server, url = await serve(handler)
    async with server:
        assert await (await client.post(url, b"{}")).read() == b"ok"
        assert await (await client.post(url, b"{}")).read() == b"ok"  # retried on a fresh connection
        assert served == 3


async def test_connection_refused_is_a_connect_error(client: UpstreamClient) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(UpstreamError) as exc:
        await client.post(f"http://127.0.0.1:{port}/v1/completions", b"{}")
    assert exc.value.kind == "connect"


async def test_silence_is_a_timeout_and_a_cut_stream_is_a_failure(client: UpstreamClient) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    server, url = await serve(silent)
    async with server:
        with pytest.raises(UpstreamError) as exc:
            await client.post(url, b"{}")
        assert exc.value.kind == "timeout"

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(HEAD + chunk(b"data: 1\n\n"))
        await writer.drain()
        writer.transport.abort()

    server, url = await serve(cut)
    async with server:
        await first_event_then_error(client, url, "failed")


async def test_connections_are_kept_alive_reused_and_expired(monkeypatch: pytest.MonkeyPatch) -> None:
    connections: list[int] = []
    handler = kept_alive(ok, connections)
    clock = FakeClock()
    monkeypatch.setattr(upstream, "time", clock)

    client = UpstreamClient(UpstreamTimeouts(connect_s=2, read_s=1, keepalive_s=10))
    server, url = await serve(handler)
    async with server:
        for _ in range(3):
            assert await (await client.post(url, b"{}")).read() == b"ok"
        assert len(connections) == 1  # one kept-alive connection for requests one after another
        clock.offset += 9  # idle, but for less than keepalive_s: reused
        assert await (await client.post(url, b"{}")).read() == b"ok"
        assert len(connections) == 1
        clock.offset += 11  # idle longer than keepalive_s: not reused
        assert await (await client.post(url, b"{}")).read() == b"ok"
        assert len(connections) == 2
    await client.aclose()


async def test_connection_close_and_eof_delimited_bodies() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nbody until EOF")  # no length, not chunked
        await writer.drain()
        writer.close()

    client = UpstreamClient(UpstreamTimeouts(connect_s=2, read_s=1))
    server, url = await serve(handler)
    async with server:
        assert await (await client.post(url, b"{}")).read() == b"body until EOF"
        assert await (await client.post(url, b"{}")).read() == b"body until EOF"
        assert connections == 2  # `connection: close` is honoured
    await client.aclose()


async def test_large_bodies_and_a_slow_reader_lose_nothing(client: UpstreamClient) -> None:
    body = bytes(range(256)) * (5 * 4096)  # 5 MiB: more than the client buffers before it stops reading
    events = [b"data: %d %s\n\n" % (i, b"x" * 1000) for i in range(4000)]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        await read_request(reader)
        writer.write(HEAD + chunk(b"".join(events)) + b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server, url = await serve(handler)
    async with server:
        assert await (await client.post(url, b"{}")).read() == body
        resp = await client.post(url, b"{}")
        got = []
        async for batch in resp.events():
            got += batch
            await asyncio.sleep(0.001)  # slower than the server: the client pauses its reading
        resp.release()
    assert got == [e[6:-2] for e in events]


async def test_requests_beyond_max_connections_wait_for_one() -> None:
    release = asyncio.Event()
    connections: list[int] = []

    async def when_released(writer: asyncio.StreamWriter) -> None:
        await release.wait()
        await ok(writer)

    handler = kept_alive(when_released, connections)

    client = UpstreamClient(UpstreamTimeouts(connect_s=2, read_s=30, max_connections=1))
    server, url = await serve(handler)
    async with server:
        first = asyncio.create_task(client.post(url, b"{}"))
        await until(lambda: len(connections) == 1, "the first request's connection")
        second = asyncio.create_task(client.post(url, b"{}"))
        (pool,) = client._pools.values()
        # the second request queues for the one connection instead of opening another
        await until(lambda: len(pool.waiting) == 1, "the second request to wait for a connection")
        assert not second.done() and len(connections) == 1 and len(pool.open) == 1
        release.set()
        assert await (await first).read() == b"ok"
        assert await (await second).read() == b"ok"  # on the connection the first gave back
        assert len(connections) == 1
    await client.aclose()


async def test_silence_mid_stream_and_a_cancelled_caller() -> None:
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(HEAD + chunk(b"data: 1\n\n"))
        await writer.drain()
        await asyncio.sleep(5)

    client = UpstreamClient(UpstreamTimeouts(connect_s=2, read_s=0.5))
    server, url = await serve(stalls)
    async with server:
        await first_event_then_error(client, url, "timeout")

    received = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        received.set()
        await asyncio.sleep(5)

    server, url = await serve(silent)
    async with server:
        pending = asyncio.create_task(client.post(url, b"{}"))  # headers never come: the caller gives up
        await asyncio.wait_for(received.wait(), 30)  # ... while it waits for them, not while connecting
        assert not pending.done()
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert all(not pool.idle for pool in client._pools.values())  # the connection is not reused
    await client.aclose()


async def test_https_backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the openssl command (Debian's openssl package, on every Debian/Ubuntu and in the python images) makes
    # the certificate; without it this fails rather than skips: the https path would go untested
    assert shutil.which("openssl"), "the openssl command is not installed: apt-get install openssl"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
         "-subj", "/CN=vllm", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the back-end's CA, as an operator would set it
    client = UpstreamClient(UpstreamTimeouts(connect_s=2, read_s=2))
    async with server:
        assert await (await client.post(f"https://127.0.0.1:{port}/v1/completions", b"{}")).read() == b"ok"
    await client.aclose()


async def test_a_stream_released_at_its_last_event_goes_back_to_the_pool(client: UpstreamClient) -> None:
    released = asyncio.Event()

    async def events_then_end(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + chunk(b"data: 1\n\ndata: [DONE]\n\n"))
        await writer.drain()
        await released.wait()  # the end of the HTTP message comes after the caller let go of the stream
        released.clear()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    connections: list[int] = []
    handler = kept_alive(events_then_end, connections)

    def idle() -> int:
        return sum(len(pool.idle) for pool in client._pools.values())

    server, url = await serve(handler)
    async with server:
        for _ in range(2):
            resp = await client.post(url, b"{}")
            batches = resp.events()
            assert await anext(batches) == [b"1", b"[DONE]"]
            resp.release_at_end()  # not waiting for the message's end
            assert idle() == 0  # the message has not ended: the connection is not back yet
            released.set()
            await until(lambda: idle() == 1, "the connection to go back to the pool at the message's end")
        assert len(connections) == 1  # the connection was reused once its message had ended
