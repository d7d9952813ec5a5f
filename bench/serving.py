"""Gateway overhead: the gateway against the same vLLM server called directly, same prompts, same
concurrency (1, 8, 32), rounds interleaved so both sides see the same machine noise.

Prints, per concurrency, the throughput ratio (gateway / direct; target >= 0.97) and the added p50
time-to-first-token (target <= 3 ms). Run: `python bench/serving.py [--model tiny|smollm2|DIR]`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import KEY, free_port, gateway_process


async def one(client: httpx.AsyncClient, url: str, model: str, max_tokens: int) -> tuple[float, float, int]:
    body = {"model": model, "prompt": "The review says the product", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                tokens += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
    return ttft or 0.0, time.perf_counter() - start, tokens


async def round_(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> tuple[float, float]:
    """Returns (tokens per second, p50 TTFT in seconds) of `requests` requests at `concurrency`."""
    headers = {"Authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=600, limits=limits) as client:
        sem = asyncio.Semaphore(concurrency)

        async def guarded() -> tuple[float, float, int]:
            async with sem:
                return await one(client, url, model, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(guarded() for _ in range(requests)))
        wall = time.perf_counter() - start
    tokens = sum(r[2] for r in results)
    return tokens / wall, statistics.median(r[0] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (default), smollm2 or a model directory")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=6, help="paired rounds (direct, gateway) per concurrency")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--no-logging", action="store_true", help="gateway with the event store off")
    args = parser.parse_args()
    vport = free_port()
    settings = {"model": args.model, "model_cache_dir": str(Path("~/.cache/loraloop/models").expanduser()),
                "backends": {"managed": {"port": vport, "max_model_len": 1024}}, "aliases": {"bench": {}},
                "store": {"enabled": not args.no_logging}}  # fmt: skip
    direct = f"http://127.0.0.1:{vport}"
    with (
        tempfile.TemporaryDirectory() as tmp,
        gateway_process(
            {**settings, "store": {**settings["store"], "root": str(Path(tmp) / "events")}}, Path(tmp)
        ) as gateway,
    ):
        print(f"{'conc':>4} {'ratio':>6} {'range':>13} {'added p50 TTFT':>13}  (median over paired rounds)")
        for conc in (int(c) for c in args.concurrency.split(",")):
            requests = max(8, conc * 4)
            asyncio.run(round_(direct, "base", conc, conc, 8))  # warm-up both paths
            asyncio.run(round_(gateway, "bench", conc, conc, 8))
            ratios, added = [], []
            for r in range(args.rounds):
                # paired rounds, alternating which side goes first, so drift and noise cancel out
                order = [("direct", direct, "base"), ("gateway", gateway, "bench")]
                if r % 2:
                    order.reverse()
                got = {name: asyncio.run(round_(url, model, conc, requests, args.max_tokens))
                       for name, url, model in order}  # fmt: skip
                ratios.append(got["gateway"][0] / got["direct"][0])
                added.append((got["gateway"][1] - got["direct"][1]) * 1000)
            ratio, added_ms = statistics.median(ratios), statistics.median(added)
            print(f"{conc:>4} {ratio:>6.3f} {min(ratios):>6.3f}-{max(ratios):<6.3f} {added_ms:>10.2f} ms", flush=True)
        print("targets: ratio >= 0.97, added p50 TTFT <= 3 ms")


if __name__ == "__main__":
    main()
