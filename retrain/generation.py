"""Generations for the gate: greedy answers of the base and of adapters from a vLLM OpenAI server.

* ``vllm_server``: the server the recipe names (``eval.vllm_url``), or one started on the base for the block with
  the gateway's managed back-end command line and environment.
* ``loaded_adapters``: adapters loaded at runtime (``/v1/load_lora_adapter``) under unique names, unloaded
  afterwards.
* ``generate_predictions``: temperature 0, concurrent requests. Rows that offered ``tools`` or asked for a
  ``response_format`` are sent as chat requests with them, and the answers' ``tool_calls`` are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from retrain.evaluators.base import Prediction, ToolCall, normalize
from retrain.recipe import EvalSection


@contextlib.contextmanager
def vllm_server(cfg: EvalSection, base: str, *, log_path: Path) -> Iterator[str]:
    """``cfg.vllm_url`` when given; otherwise start a vLLM OpenAI server on ``base`` for the block (the
    same command line and environment as the gateway's managed back-end) and stop it afterwards."""
    if cfg.vllm_url:
        yield cfg.vllm_url.rstrip("/")
        return
    import socket

    from core.serving_config import ManagedBackendConfig
    from serving.managed import detect_device, vllm_command, vllm_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mcfg = ManagedBackendConfig(port=port, max_model_len=cfg.max_model_len, max_loras=2)
    device = detect_device("auto")
    cmd = vllm_command(base, cfg.served_model_name, mcfg, device, max_lora_rank=cfg.max_lora_rank)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as fh:
        proc = subprocess.Popen(cmd, env=vllm_env(mcfg, device), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + cfg.start_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode} while starting; see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not become healthy in {cfg.start_timeout_s}s; see {log_path}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def loaded_adapters(url: str, adapters: dict[str, Path]) -> Iterator[None]:
    """Load adapters into a vLLM server under the given names; unload them afterwards."""
    loaded = []
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            for name, path in adapters.items():
                r = c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(Path(path).resolve())})
                if r.status_code >= 400:
                    raise RuntimeError(f"vLLM refused adapter {name}: {r.status_code} {r.text[:200]}")
                loaded.append(name)
        yield
    finally:
        with httpx.Client(base_url=url, timeout=60) as c:
            for name in loaded:
                with contextlib.suppress(httpx.HTTPError):
                    c.post("/v1/unload_lora_adapter", json={"lora_name": name})


def request_for(row: dict[str, Any], model: str, max_tokens: int) -> tuple[str, dict[str, Any]]:
    """The endpoint and body of one greedy generation: chat with the row's ``tools`` / ``tool_choice`` /
    ``response_format`` when it has any (and its messages), else the rendered prompt on completions."""
    sampling = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "seed": 0}
    extras = {k: row[k] for k in ("tools", "tool_choice", "response_format") if row.get(k)}
    if extras and row.get("messages"):
        return "/v1/chat/completions", {**sampling, "messages": row["messages"], **extras}
    return "/v1/completions", {**sampling, "prompt": str(row["prompt"])}


def prediction_from(endpoint: str, reply: dict[str, Any]) -> Prediction:
    choice = reply["choices"][0]
    if endpoint == "/v1/completions":
        return Prediction(normalize(str(choice["text"])))
    message = choice["message"]
    calls = tuple(ToolCall(str(c["function"]["name"]), str(c["function"].get("arguments") or ""))
                  for c in message.get("tool_calls") or ())  # fmt: skip
    return Prediction(normalize(message.get("content")), calls)


async def _generate_async(
    url: str, model: str, rows: Sequence[dict[str, Any]], max_tokens: int, concurrency: int
) -> list[Prediction]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one(row: dict[str, Any]) -> Prediction:
            endpoint, body = request_for(row, model, max_tokens)
            async with sem:
                r = await client.post(endpoint, json=body)
            r.raise_for_status()
            return prediction_from(endpoint, r.json())

        return list(await asyncio.gather(*(one(r) for r in rows)))


def generate_predictions(
    url: str, model: str, rows: Sequence[dict[str, Any]], *, max_tokens: int, concurrency: int
) -> list[Prediction]:
    """Greedy answers (text and tool calls) of ``model`` to holdout rows from a vLLM server (concurrent)."""
    return asyncio.run(_generate_async(url, model, list(rows), max_tokens, concurrency))


def generate(url: str, model: str, prompts: Sequence[str], *, max_tokens: int, concurrency: int) -> list[str]:
    """Greedy completions of already chat-rendered ``prompts`` from a vLLM server (concurrent requests)."""
    rows = [{"prompt": p} for p in prompts]
    return [p.text for p in generate_predictions(url, model, rows, max_tokens=max_tokens, concurrency=concurrency)]


__all__ = ["generate", "generate_predictions", "loaded_adapters", "prediction_from", "request_for", "vllm_server"]
