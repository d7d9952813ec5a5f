"""A stand-in for vLLM on a GPU host: an OpenAI-style server whose "engine" batches continuously with a
fixed step time and spends no CPU on it, the way a GPU runs vLLM's forward passes off the host's cores.

- Requests that arrive while a step runs wait for the next one; an idle engine starts a step at once.
- Every step gives each running request one token; a request's first step (its prefill) gives its
  first token. So time-to-first-token = the wait for a step boundary + one step, as in vLLM.
- The bytes are vLLM's own chunks (bench/standin_vllm.py), so the gateway parses what it would parse.

What it measures against: bench/serving_load.py `--engine emulated` puts it in place of vLLM, to measure
what the gateway adds when the engine's compute is not on the gateway's cores, which a CPU-only host
cannot show with real vLLM. The HTTP side (uvicorn, FastAPI, SSE) is real and runs on the host's CPU,
as vLLM's API server does on a GPU host.

Run as a process: `python -m bench.emulated_engine PORT [STEP_SECONDS]` (default 0.02).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.standin_vllm import CHUNK, stream_end


@dataclass
class Sequence:
    """One request in the engine: tokens still to produce and where its tokens go."""

    left: int
    tokens: asyncio.Queue[bool] = field(default_factory=asyncio.Queue)  # True per token, False at the end


class Engine:
    """Continuous batching with a fixed step time: admission only at step boundaries."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.has_work = asyncio.Event()
        self.steps = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.has_work.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.waiting and not self.running:
                self.has_work.clear()
                await self.has_work.wait()
            self.running += self.waiting
            self.waiting = []
            end = loop.time() + self.step_s
            await asyncio.sleep(self.step_s)  # the forward pass, on the "GPU"
            while (late := end - loop.time()) > 0:  # the event loop's timers may fire early
                await asyncio.sleep(late)
            self.steps += 1
            for seq in self.running:
                seq.left -= 1
                seq.tokens.put_nowait(True)
                if seq.left == 0:
                    seq.tokens.put_nowait(False)
            self.running = [s for s in self.running if s.left > 0]


def build(step_s: float) -> FastAPI:
    engine = Engine(step_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(engine.run())
        yield
        task.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {}

    @app.get("/v1/models")
    async def models() -> dict[str, object]:
        return {"object": "list", "data": [{"id": "base", "object": "model", "created": 0, "owned_by": "bench"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        seq = Sequence(max(1, int(body.get("max_tokens") or 16)))
        engine.add(seq)

        async def events() -> AsyncIterator[bytes]:
            while await seq.tokens.get():
                yield b"data: " + CHUNK + b"\n\n"
            for end in stream_end(body):
                yield end

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def serve(port: int, step_s: float) -> None:
    uvicorn.run(build(step_s), host="127.0.0.1", port=port, log_level="error", access_log=False,
                timeout_keep_alive=120)  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port", type=int)
    parser.add_argument("step_seconds", type=float, nargs="?", default=0.02, help="the engine's step time")
    args = parser.parse_args()
    serve(args.port, args.step_seconds)
