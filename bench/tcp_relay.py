"""The floor of one extra process in the path: a byte-level TCP relay (uvloop protocols, no HTTP
parsing, nothing copied twice). bench/serving_load.py runs it as its `relay` arm (`--relay`), next to the
`hop` arm (bench/hop_proxy.py, an HTTP proxy), to tell what an extra process and two more loopback
sockets cost on this machine from what handling the HTTP messages costs. It cannot rewrite the
model name, so its arm asks vLLM for the served base model directly.

Run: `python bench/tcp_relay.py PORT UPSTREAM_HOST UPSTREAM_PORT`.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import uvloop


class _ToClient(asyncio.Protocol):
    """The relay's connection to the upstream: what it sends goes to the client as it comes."""

    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _FromClient(asyncio.Protocol):
    """One client connection: opens its own upstream connection and relays both ways."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.pending: list[bytes] = []  # what the client sent before the upstream connection was up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses (no isinstance check); uvloop
        # sets TCP_NODELAY on them
        self.client = client = cast(asyncio.Transport, transport)
        asyncio.get_running_loop().create_task(self._connect(client))

    async def _connect(self, client: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(lambda: _ToClient(client), self.host, self.port)
        except OSError:
            client.close()
            return
        self.upstream = upstream
        for data in self.pending:
            upstream.write(data)
        self.pending = []

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def serve(port: int, host: str, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _FromClient(host, upstream_port), "127.0.0.1", port)
    await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port", type=int)
    parser.add_argument("upstream_host")
    parser.add_argument("upstream_port", type=int)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream_host, args.upstream_port))
