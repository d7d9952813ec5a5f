"""bench/tcp_relay.py is a measuring instrument (bench/serving_load.py --relay): it must pass every byte
both ways unchanged, also what a client sends before the upstream connection is up, and close each
side when the other closes."""

from __future__ import annotations

import asyncio

from bench.serving_load import relay_process


async def test_the_relay_passes_bytes_both_ways_and_closes_with_the_upstream() -> None:
    received = bytearray()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            received.extend(await reader.readexactly(11))
        except asyncio.IncompleteReadError:  # relay_process's start-up probe: connects, sends nothing
            writer.close()
            return
        for part in (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"):
            writer.write(part)
            await writer.drain()
        writer.close()  # the upstream ends the exchange: the relay must end the client's side

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    upstream_port = server.sockets[0].getsockname()[1]
    try:
        with relay_process(f"http://127.0.0.1:{upstream_port}") as relay:  # its own process, on uvloop
            reader, writer = await asyncio.open_connection("127.0.0.1", int(relay.rsplit(":", 1)[1]))
            writer.write(b"hello")  # sent at once: may arrive before the relay's upstream connection is up
            writer.write(b" relay")
            await writer.drain()
            got = await asyncio.wait_for(reader.read(), 10)  # to EOF: the relay closed the client's side
            writer.close()
        assert got == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
        assert bytes(received) == b"hello relay"
    finally:
        server.close()
