"""Gateway overhead: the gateway against the same vLLM server called directly, same prompts, same
concurrency (1, 8, 32), rounds interleaved so both sides see the same machine noise.

Prints, per concurrency, the throughput ratio (gateway / direct; target >= 0.97) and the added p50
time-to-first-token (target <= 3 ms): medians over paired rounds, with the range of the per-round
ratios. The load generator is aiohttp (a C parser: it takes little CPU from vLLM and the gateway on a
small machine) with one keep-alive session per side, as a real client would hold.
Run: `python bench/serving.py [--model smollm2|tiny|DIR]`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import KEY, free_port, gateway_process


@dataclass
class Side:
    name: str
    url: str
    model: str
    session: aiohttp.ClientSession


async def one(side: Side, max_tokens: int) -> tuple[float, int]:
    """One streamed completion: (time to first token, tokens)."""
    body = {"model": side.model, "prompt": "The review says the product", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    start = time.perf_counter()
    ttft, tokens = 0.0, 0
    async with side.session.post(f"{side.url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if line.startswith(b"data: {"):
                tokens += 1
                if tokens == 1:
                    ttft = time.perf_counter() - start
    return ttft, tokens


async def round_(side: Side, concurrency: int, requests: int, max_tokens: int) -> tuple[float, float]:
    """(tokens per second, p50 TTFT in seconds) of `requests` requests at `concurrency`."""
    sem = asyncio.Semaphore(concurrency)

    async def guarded() -> tuple[float, int]:
        async with sem:
            return await one(side, max_tokens)

    start = time.perf_counter()
    results = await asyncio.gather(*(guarded() for _ in range(requests)))
    wall = time.perf_counter() - start
    return sum(r[1] for r in results) / wall, statistics.median(r[0] for r in results)


async def compare(direct: str, gateway: str, args: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    timeout = aiohttp.ClientTimeout(total=1800)
    async with (
        aiohttp.ClientSession(headers=headers, timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as d,
        aiohttp.ClientSession(headers=headers, timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as g,
    ):
        sides = [Side("direct", direct, "base", d), Side("gateway", gateway, "bench", g)]
        print(f"{'conc':>4} {'ratio':>6} {'range':>13} {'added p50 TTFT':>14}  (medians over paired rounds)")
        for conc in (int(c) for c in args.concurrency.split(",")):
            requests = max(args.min_requests, conc * args.requests_per_slot)
            for side in sides:  # warm-up: connections, prefix cache, first-call paths
                await round_(side, conc, conc, 4)
            ratios, added = [], []
            for r in range(args.rounds):
                got = {}
                for side in sides if r % 2 == 0 else sides[::-1]:  # alternate who goes first
                    got[side.name] = await round_(side, conc, requests, args.max_tokens)
                ratios.append(got["gateway"][0] / got["direct"][0])
                added.append((got["gateway"][1] - got["direct"][1]) * 1000)
            ratio, added_ms = statistics.median(ratios), statistics.median(added)
            print(f"{conc:>4} {ratio:>6.3f} {min(ratios):>6.3f}-{max(ratios):<6.3f} {added_ms:>11.2f} ms", flush=True)
        print("targets: ratio >= 0.97, added p50 TTFT <= 3 ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 (default, the embedded model), tiny or a dir")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=8, help="paired rounds (direct, gateway) per concurrency")
    parser.add_argument("--requests-per-slot", type=int, default=2, help="requests per round = concurrency x this")
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--no-logging", action="store_true", help="gateway with the event store off")
    args = parser.parse_args()
    vport = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        settings = {"model": args.model, "model_cache_dir": str(Path("~/.cache/loraloop/models").expanduser()),
                    "backends": {"managed": {"port": vport, "max_model_len": 1024}}, "aliases": {"bench": {}},
                    "store": {"enabled": not args.no_logging, "root": str(Path(tmp) / "events")}}  # fmt: skip
        with gateway_process(settings, Path(tmp)) as gateway:
            asyncio.run(compare(f"http://127.0.0.1:{vport}", gateway, args))


if __name__ == "__main__":
    main()
