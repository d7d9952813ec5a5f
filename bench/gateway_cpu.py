"""The gateway's CPU cost per streamed token, measured as process CPU time rather than wall time, so
it holds on a noisy shared machine — on a small host every CPU-second the gateway spends is taken
from vLLM, so this is what decides the end-to-end throughput ratio of bench/serving_load.py.

A stand-in vLLM (bench/standin_vllm.py, its own process) streams paced tokens; the load generator
reads them directly and through a `loraloop serve` process (remote back-end, event store on with
durable request logging: the production defaults). Prints the gateway's CPU microseconds per token
and per request and, as the baseline of the same run, the ratio to what the stand-in upstream itself
spends (a bare Starlette SSE server: one HTTP hop). Run: `python bench/gateway_cpu.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import KEY, add_model, free_port, gateway_process, model_dir, pid_listening_on, wait_healthy


async def load(url: str, model: str, concurrency: int, requests: int, tokens: int, pids: list[int]) -> list[float]:
    """Runs the requests; returns the CPU seconds each process in `pids` spent meanwhile."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    body = {"model": model, "prompt": "hello", "max_tokens": tokens, "stream": True}
    async with httpx.AsyncClient(timeout=120, limits=limits, headers={"Authorization": f"Bearer {KEY}"}) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with sem, client.stream("POST", f"{url}/v1/completions", json=body) as resp:
                resp.raise_for_status()
                async for _ in resp.aiter_raw():
                    pass

        procs = [psutil.Process(p) for p in pids]
        before = [sum(p.cpu_times()[:2]) for p in procs]
        await asyncio.gather(*(one() for _ in range(requests)))
        return [sum(p.cpu_times()[:2]) - b for p, b in zip(procs, before, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--step-ms", type=float, default=5.0, help="the stand-in's pause per token")
    parser.add_argument("--rounds", type=int, default=5)
    add_model(parser)
    args = parser.parse_args()
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "bench.standin_vllm", str(up_port), str(args.step_ms / 1000)],
                                cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    try:
        up_url = f"http://127.0.0.1:{up_port}"
        wait_healthy(up_url, upstream, "stand-in vLLM")
        with tempfile.TemporaryDirectory() as tmp:
            settings = {"model": model_dir(args.model, Path(tmp)), "state_dir": str(Path(tmp) / "state"),
                        "store": {"root": str(Path(tmp) / "events")}, "aliases": {"bench": {}},
                        "backends": {"mode": "remote", "urls": [up_url], "health_interval_s": 1}}  # fmt: skip
            with gateway_process(settings, Path(tmp)) as gw_url:
                gw_pid = pid_listening_on(gw_url)
                pids = [upstream.pid, gw_pid]
                asyncio.run(load(gw_url, "bench", args.concurrency, args.concurrency, args.tokens, pids))  # warm-up
                per_token, per_request, ratio = [], [], []
                for _ in range(args.rounds):
                    time.sleep(0.5)
                    up_cpu, gw_cpu = asyncio.run(
                        load(gw_url, "bench", args.concurrency, args.requests, args.tokens, pids)
                    )
                    tokens = args.requests * args.tokens
                    per_token.append(gw_cpu / tokens * 1e6)
                    per_request.append(gw_cpu / args.requests * 1e6)
                    if up_cpu > 0:  # CPU times tick in 10 ms: a tiny smoke run can measure none upstream
                        ratio.append(gw_cpu / up_cpu)
                print(f"concurrency {args.concurrency}, {args.requests} requests x {args.tokens} tokens, "
                      f"median of {args.rounds} rounds:")  # fmt: skip
                print(f"  gateway CPU per token:   {statistics.median(per_token):7.1f} us")
                print(f"  gateway CPU per request: {statistics.median(per_request):7.0f} us")
                if ratio:
                    print(f"  gateway / stand-in upstream CPU: {statistics.median(ratio):.2f}x "
                          f"(range {min(ratio):.2f}-{max(ratio):.2f})")  # fmt: skip
                else:
                    print("  gateway / stand-in upstream CPU: not measured (the upstream used < 10 ms of CPU)")
    finally:
        upstream.terminate()
        upstream.wait(10)


if __name__ == "__main__":
    main()
