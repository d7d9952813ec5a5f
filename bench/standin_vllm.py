"""A stand-in for vLLM's OpenAI server that streams pre-made chunks (vLLM's exact bytes) with a fixed
pause per token, like an engine step: what the gateway's own cost is measured against.

Run as a process: `python -m bench.standin_vllm PORT [STEP_SECONDS]`."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

CHUNK = (
    b'{"id":"cmpl-b0f067a5e5987c15","object":"text_completion","created":1795975128,"model":"base","choices":'
    b'[{"index":0,"text":" 16482","logprobs":null,"finish_reason":null,"stop_reason":null,"token_ids":null}]}'
)
USAGE = (
    b'{"id":"cmpl-b0f067a5e5987c15","object":"text_completion","created":1795975128,"model":"base","choices":[],'
    b'"usage":{"prompt_tokens":7,"total_tokens":71,"completion_tokens":64,"prompt_tokens_details":null}}'
)


def stream_end(body: dict[str, Any]) -> list[bytes]:
    """What ends a stream, one write each as vLLM sends them: the usage chunk when the request asked
    for it, then [DONE]."""
    usage = [b"data: " + USAGE + b"\n\n"] if (body.get("stream_options") or {}).get("include_usage") else []
    return [*usage, b"data: [DONE]\n\n"]


def build(step_s: float) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {}

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        n = int(body.get("max_tokens") or 16)

        async def events() -> AsyncIterator[bytes]:
            for i in range(n):
                if step_s > 0:
                    await asyncio.sleep(step_s)
                elif i % 50 == 0:
                    await asyncio.sleep(0)
                yield b"data: " + CHUNK + b"\n\n"
            for end in stream_end(body):
                yield end

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def serve(port: int, step_s: float) -> None:
    uvicorn.run(build(step_s), host="127.0.0.1", port=port, log_level="error", access_log=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port", type=int)
    parser.add_argument("step_seconds", type=float, nargs="?", default=0.005, help="pause per token")
    args = parser.parse_args()
    serve(args.port, args.step_seconds)
