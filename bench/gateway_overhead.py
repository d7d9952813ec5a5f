"""The gateway's own cost, without vLLM's noise: a stand-in upstream that streams pre-made vLLM chunks as
fast as it can, called directly and through the gateway (event store off), one request at a time.

Prints the added time per request (1-chunk streams: routing, validation, the second hop) and per
streamed chunk (2000-chunk streams), as medians — on a machine whose cores are not busy with vLLM,
this is what the gateway adds to time-to-first-token and what it costs per token.
Run: `python bench/gateway_overhead.py [--requests 300] [--chunks 2000] [--streams 7]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import standin_vllm
from bench.common import add_model, free_port, model_dir


def serve(app: FastAPI, port: int) -> None:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(100):
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)


def timed(client: httpx.Client, model: str, chunks: int) -> float:
    start = time.perf_counter()
    body = {"model": model, "prompt": "x", "stream": True, "max_tokens": chunks}
    with client.stream("POST", "/v1/completions", json=body) as resp:
        got = sum(1 for line in resp.iter_lines() if line.startswith("data: {"))
    assert got == chunks, got
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="1-chunk requests per side")
    parser.add_argument("--chunks", type=int, default=2000, help="chunks per long stream")
    parser.add_argument("--streams", type=int, default=7, help="long streams per side")
    add_model(parser)
    args = parser.parse_args()

    from core.settings import Settings
    from serving.app import build_app

    with tempfile.TemporaryDirectory() as tmp:
        up_port, gw_port = free_port(), free_port()
        serve(standin_vllm.build(step_s=0), up_port)
        settings = Settings(
            model=model_dir(args.model, Path(tmp)), port=gw_port, state_dir=Path(tmp) / "state",
            store={"root": str(Path(tmp) / "events"), "enabled": False}, aliases={"bench": {}},
            backends={"mode": "remote", "urls": [f"http://127.0.0.1:{up_port}"], "health_interval_s": 0.5},
        )  # fmt: skip
        serve(build_app(settings), gw_port)
        time.sleep(1.5)  # first health check
        direct = httpx.Client(base_url=f"http://127.0.0.1:{up_port}", timeout=60)
        gateway = httpx.Client(base_url=f"http://127.0.0.1:{gw_port}", timeout=60)
        for long, chunks, rounds in ((False, 1, args.requests), (True, args.chunks, args.streams)):
            d: list[float] = []
            g: list[float] = []
            for i in range(rounds):
                pair = [(direct, "base", d), (gateway, "bench", g)]
                for client, model, out in pair if i % 2 else reversed(pair):
                    out.append(timed(client, model, chunks))
            added = (statistics.median(g) - statistics.median(d)) * 1000
            if not long:
                direct_ms, gateway_ms = statistics.median(d) * 1000, statistics.median(g) * 1000
                print(f"per request (1-chunk stream): direct {direct_ms:.2f} ms, gateway {gateway_ms:.2f} ms: "
                      f"+{added:.2f} ms (TTFT target <= 3 ms)")  # fmt: skip
            else:
                print(f"per streamed chunk ({chunks}-chunk stream): +{added * 1000 / chunks:.1f} us")


if __name__ == "__main__":
    main()
