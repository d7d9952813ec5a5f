"""The floor of one HTTP hop: a raw-ASGI proxy on uvicorn with loraloop's own upstream client and
nothing else — no validation, routing, logging or metrics. bench/serving_load.py runs it as its `hop` arm
(`--hop`) to tell what any Python proxy in front of vLLM costs on this machine from what the gateway's
own work adds. Not for production: it answers nothing but the happy path.

Run: `python bench/hop_proxy.py PORT UPSTREAM_URL SERVED_MODEL`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import msgspec
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from serving.upstream import UpstreamClient, UpstreamTimeouts


def make_app(upstream: str, model: str) -> Any:
    client: UpstreamClient | None = None

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal client
        if scope["type"] != "http":
            return
        if client is None:  # created on the server's event loop
            client = UpstreamClient(UpstreamTimeouts(connect_s=10, read_s=600))
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        data = msgspec.json.decode(body)
        data["model"] = model  # the one thing a proxy in front of an alias must change
        resp = await client.post(upstream + scope["path"], msgspec.json.encode(data))
        content_type = b"text/event-stream" if data.get("stream") else b"application/json"
        await send({"type": "http.response.start", "status": resp.status, "headers": [(b"content-type", content_type)]})
        if data.get("stream"):
            async for batch in resp.events():
                chunk = b"".join(b"data: " + payload + b"\n\n" for payload in batch)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            resp.release_at_end()
            await send({"type": "http.response.body", "body": b""})
        else:
            await send({"type": "http.response.body", "body": await resp.read()})

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port", type=int)
    parser.add_argument("upstream_url")
    parser.add_argument("served_model", help="the model name the upstream serves (every request is sent to it)")
    args = parser.parse_args()
    uvicorn.run(
        make_app(args.upstream_url, args.served_model),
        host="127.0.0.1",
        port=args.port,
        log_level="error",
        access_log=False,
        timeout_keep_alive=120,
    )
