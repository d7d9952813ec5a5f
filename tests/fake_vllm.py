"""A fake vLLM OpenAI server for unit tests, served on loopback sockets by uvicorn in a thread (the
gateway's data plane speaks real HTTP; see serving/upstream.py).

It answers like vLLM does — same shapes, `usage`, SSE with `[DONE]`, the include_usage chunk — and
records every request body it received so tests can check what the gateway forwarded."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse


def build_fake_vllm(served: str = "base") -> FastAPI:  # noqa: C901 -- its routes are closures over the app; mccabe counts them here
    app = FastAPI()
    reset_fake_vllm(app)

    def _text(body: dict[str, Any]) -> str:
        if "messages" in body:
            last = body["messages"][-1]["content"]
            return f"echo {last}" if isinstance(last, str) else "echo"
        prompt = body["prompt"]
        return f"echo {prompt if isinstance(prompt, str) else 'tokens'}"

    def _known(model: str) -> bool:
        return model == served or model in app.state.adapters

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({}, status_code=200 if app.state.healthy else 503)

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request) -> JSONResponse:
        body = await request.json()
        app.state.ops.append(("load", body["lora_name"]))
        if body["lora_name"] in app.state.adapters:
            msg = f"The lora adapter '{body['lora_name']}' has already been loaded."
            return JSONResponse({"error": {"message": msg, "type": "BadRequestError", "code": 400}}, 400)
        app.state.adapters.add(body["lora_name"])
        return JSONResponse("ok")

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request) -> JSONResponse:
        body = await request.json()
        app.state.ops.append(("unload", body["lora_name"]))
        if body["lora_name"] not in app.state.adapters:
            msg = f"The lora adapter '{body['lora_name']}' cannot be found."
            return JSONResponse({"error": {"message": msg, "type": "NotFoundError", "code": 404}}, 404)
        app.state.adapters.discard(body["lora_name"])
        return JSONResponse("ok")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [{"id": served, "object": "model", "parent": None}]
        data += [{"id": a, "object": "model", "parent": served} for a in sorted(app.state.adapters)]
        return {"object": "list", "data": data}

    async def _generate(request: Request, chat: bool) -> Any:
        body = await request.json()
        app.state.received.append(body)
        if app.state.fail_next is not None:
            status, app.state.fail_next = app.state.fail_next, None
            return JSONResponse(
                {"error": {"message": "boom", "type": "BadRequestError", "param": None, "code": status}},
                status_code=status,
            )
        if app.state.garbage_next:  # a 200 that is not JSON: a proxy's error page, a wrong server
            app.state.garbage_next = False
            return Response(b"<html>bad gateway</html>", media_type="text/html")
        if not _known(body["model"]):
            return JSONResponse(
                {"error": {"message": f"The model `{body['model']}` does not exist.", "type": "NotFoundError",
                           "param": "model", "code": 404}},
                status_code=404,
            )  # fmt: skip
        text, created = _text(body), int(time.time())
        words = text.split(" ")
        n = body.get("n") or 1
        usage = {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)}
        obj = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            choices = [
                {"index": i, "finish_reason": "stop", "logprobs": None,
                 **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
                for i in range(n)
            ]  # fmt: skip
            return {"id": "upstream-id", "object": obj, "created": created, "model": body["model"],
                    "choices": choices, "usage": usage}  # fmt: skip

        async def events() -> AsyncIterator[bytes]:
            chunk_obj = "chat.completion.chunk" if chat else "text_completion"
            base = {"id": "upstream-id", "object": chunk_obj, "created": created, "model": body["model"]}
            if chat:
                for i in range(n):
                    delta = {"role": "assistant", "content": ""}
                    yield _sse({**base, "choices": [{"index": i, "delta": delta, "finish_reason": None}]})
            for k, word in enumerate(words):
                piece = word if k == 0 else " " + word
                last = k == len(words) - 1
                for i in range(n):
                    choice: dict[str, Any] = {"index": i, "finish_reason": "stop" if last else None}
                    choice.update({"delta": {"content": piece}} if chat else {"text": piece, "logprobs": None})
                    yield _sse({**base, "choices": [choice]})
            if (body.get("stream_options") or {}).get("include_usage"):
                yield _sse({**base, "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await _generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _generate(request, chat=False)

    return app


def reset_fake_vllm(app: FastAPI) -> None:
    """Forget everything a previous test did to the fake."""
    app.state.received = []
    app.state.healthy = True
    app.state.adapters = set()
    app.state.ops = []
    app.state.fail_next = None
    app.state.garbage_next = False


@contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """Serve `app` on a free loopback port from a background thread; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, name=f"fake-vllm-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the fake vLLM did not start on port {port}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()  # compact, like vLLM
