"""Gateway overhead: the gateway against the same vLLM server called directly, same prompts, same
concurrency (1, 8, 32), rounds interleaved so both sides see the same machine noise.

Prints, per concurrency, the throughput ratio (gateway / direct; target >= 0.97) and the added p50
time-to-first-token (target <= 3 ms): medians over paired rounds, with the range of the per-round
ratios. The load generator is aiohttp (a C parser: it takes little CPU from vLLM and the gateway on a
small machine) with one keep-alive session per side, as a real client would hold.
Run: `python bench/serving.py [--model smollm2|tiny|DIR] [--pin]`.

On a small host the gateway, vLLM's processes and the load generator share the same cores, so every
CPU-second the gateway spends is taken from vLLM. `--pin` separates them the way a GPU host does
(vLLM's compute is not on the gateway's cores): vLLM with all its processes on CPU 0, the gateway and
the load generator on CPU 1 — in both arms, so the comparison stays paired.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import KEY, free_port, gateway_process, wait_healthy


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


@contextlib.contextmanager
def pinned_vllm(model: str, cache: Path, log: Path) -> Iterator[str]:
    """vLLM started here (not by the gateway) with all its processes on CPU 0; yields its URL."""
    from serving.managed import vllm_command, vllm_env
    from serving.model_prep import prepare_model
    from serving.settings import ManagedBackendConfig

    cfg = ManagedBackendConfig(port=free_port(), max_model_len=1024)
    env = {**vllm_env(cfg, "cpu"), "VLLM_CPU_OMP_THREADS_BIND": "0"}
    cmd = vllm_command(prepare_model(model, cache), "base", cfg, "cpu")
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: os.sched_setaffinity(0, {0}))  # fmt: skip
    url = f"http://127.0.0.1:{cfg.port}"
    try:
        wait_healthy(url, proc, "vLLM", log)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 (default, the embedded model), tiny or a dir")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=8, help="paired rounds (direct, gateway) per concurrency")
    parser.add_argument("--requests-per-slot", type=int, default=2, help="requests per round = concurrency x this")
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--no-logging", action="store_true", help="gateway with the event store off")
    parser.add_argument("--pin", action="store_true", help="vLLM on CPU 0; gateway and load generator on CPU 1")
    args = parser.parse_args()
    cache = Path("~/.cache/loraloop/models").expanduser()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        settings = {"model": args.model, "model_cache_dir": str(cache), "aliases": {"bench": {}},
                    "store": {"enabled": not args.no_logging, "root": str(Path(tmp) / "events")}}  # fmt: skip
        if args.pin:
            if len(os.sched_getaffinity(0)) < 2:
                raise SystemExit("--pin needs two CPUs")
            direct = stack.enter_context(pinned_vllm(args.model, cache, Path(tmp) / "vllm.log"))
            os.sched_setaffinity(0, {1})  # this process, and the gateway started from it
            settings["backends"] = {"mode": "remote", "urls": [direct], "health_interval_s": 1}
        else:
            vport = free_port()
            direct = f"http://127.0.0.1:{vport}"
            settings["backends"] = {"managed": {"port": vport, "max_model_len": 1024}}
        gateway = stack.enter_context(gateway_process(settings, Path(tmp)))
        asyncio.run(compare(direct, gateway, args))


if __name__ == "__main__":
    main()
