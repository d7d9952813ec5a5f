"""The data-plane client (serving/upstream.py) against raw loopback servers that send exactly the bytes
a test wants: SSE events split anywhere across reads, CRLF, comments, multi-line data, a server that
drops a kept-alive connection, one that never answers, one that is not there."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

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
        resp = await client.post(url, b"{}")
        batches = resp.events()
        assert await anext(batches) == [b"1"]
        with pytest.raises(UpstreamError) as exc:
            await anext(batches)
        assert exc.value.kind == "failed"
        resp.close()
