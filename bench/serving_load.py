"""Gateway overhead: the gateway against the same vLLM server called directly, same prompts, same
concurrency (1, 8, 32). Prints, per concurrency, the throughput ratio (gateway / direct; target
>= 0.97) and the added p50 time-to-first-token (target <= 3 ms).

Design — every figure comes with the noise of its own run:
- Arms: `direct` (vLLM), `direct again` (a second client session to the same vLLM: an A/A control,
  whose "overhead" is the estimator's noise and bias in this run), `gateway`, with `--hop` a
  bare proxy (bench/hop_proxy.py: uvicorn + the gateway's upstream client, no validation, routing,
  logging or metrics), the floor of one Python HTTP hop on this machine, and with `--relay` a
  byte-level TCP relay (bench/tcp_relay.py): what an extra process in the path costs without any
  HTTP handling.
- A block runs each arm once, one round each; blocks cycle through orders in which every arm takes
  every position equally often (the round that follows another is measurably slower here).
- Per block: throughput ratio and p50-TTFT difference of each arm against `direct`. Printed: the
  median over blocks (with the range of the ratios) and, for TTFT, the mean with its standard error.
- A round is `concurrency x --requests-per-slot` streamed completions of `--max-tokens` tokens
  (ignore_eos) from `concurrency` slots, each slot sending its next request when its last one ends.

The load generator is aiohttp (a C parser: it takes little CPU from vLLM and the gateway on a small
machine) with one keep-alive session per arm, as a real client would hold.
Run: `python bench/serving_load.py [--model smollm2|tiny|DIR] [--pin] [--hop] [--relay] [--no-logging]
[--engine emulated] [--vllm-url URL]` (`--vllm-url`: a running vLLM server, serving `--model`, as `direct`).

On a small host the gateway, vLLM's processes and the load generator share the same cores, so every
CPU-second the gateway spends is taken from vLLM. `--pin` separates them the way a GPU host does
(vLLM's compute is not on the gateway's cores): vLLM with all its processes on CPU 0, the gateway and
the load generator on CPU 1 — in every arm, so the comparison stays paired. `--engine emulated`
goes one step further: bench/emulated_engine.py in place of vLLM, whose batched steps take a fixed
time and no CPU, as on a GPU — what the gateway adds there, which real vLLM on a CPU cannot show.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
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
from bench.common import KEY, add_vllm_url, free_port, gateway_process, model_dir, wait_healthy


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


def block_orders(names: list[str]) -> list[list[str]]:
    """Orders in which every arm takes every position equally often: the rotations and their reverses."""
    rotations = [names[i:] + names[:i] for i in range(len(names))]
    return rotations + [r[::-1] for r in rotations]


@dataclass
class Versus:
    """One arm against `direct` over the blocks of one concurrency."""

    ratios: list[float]
    added_ms: list[float]

    def line(self, conc: int, name: str) -> str:
        added = self.added_ms
        se = statistics.stdev(added) / len(added) ** 0.5 if len(added) > 1 else float("nan")
        ratio = f"{statistics.median(self.ratios):.3f} ({min(self.ratios):.3f}-{max(self.ratios):.3f})"
        ttft = f"{statistics.median(added):>+8.1f} {statistics.mean(added):>+9.1f} ± {se:.1f}"
        return f"{conc:>4} {name:<13} {ratio:>20} {ttft}"


async def compare(urls: dict[str, tuple[str, str]], args: argparse.Namespace) -> None:
    """`urls`: arm name -> (base URL, model name); "direct" is the baseline."""
    headers = {"Authorization": f"Bearer {KEY}"}
    timeout = aiohttp.ClientTimeout(total=1800)
    async with contextlib.AsyncExitStack() as stack:
        sides = {}
        for name, (url, model) in urls.items():
            # idle connections are dropped by the client (30 s) before any server drops them (vLLM and
            # the hop proxy: 120 s here, the gateway: 75 s), so no request races a closing connection
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
            session = await stack.enter_async_context(aiohttp.ClientSession(headers=headers, timeout=timeout,
                                                                            connector=connector))  # fmt: skip
            sides[name] = Side(name, url, model, session)
        orders = block_orders(list(sides))
        blocks = args.blocks or 2 * len(orders)
        print(f"{blocks} blocks per concurrency; each arm against `direct`, the same load in the same block")
        print(f"{'conc':>4} {'arm':<13} {'throughput ratio':>20} {'added p50 TTFT, ms':>27}")
        print(f"{'':>4} {'':<13} {'median (range)':>20} {'median':>8} {'mean ± s.e.':>18}")
        for conc in (int(c) for c in args.concurrency.split(",")):
            requests = max(args.min_requests, conc * args.requests_per_slot)
            for side in sides.values():  # warm-up: connections, prefix cache, first-call paths
                await round_(side, conc, conc, 4)
            versus = {name: Versus([], []) for name in sides if name != "direct"}
            for b in range(blocks):
                got = {}
                for name in orders[b % len(orders)]:
                    got[name] = await round_(sides[name], conc, requests, args.max_tokens)
                for name, v in versus.items():
                    v.ratios.append(got[name][0] / got["direct"][0])
                    v.added_ms.append((got[name][1] - got["direct"][1]) * 1000)
            for name, v in versus.items():
                print(v.line(conc, name), flush=True)
        print("targets (gateway): ratio >= 0.97, added p50 TTFT <= 3 ms; `direct again` shows this run's noise")


@contextlib.contextmanager
def pinned_vllm(model: str, cache: Path, log: Path) -> Iterator[str]:
    """vLLM started here (not by the gateway) with all its processes on CPU 0; yields its URL."""
    from core.serving_config import ManagedBackendConfig
    from retrain.models.prepare import prepare_model
    from serving.managed import vllm_command, vllm_env

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


@contextlib.contextmanager
def emulated_engine(step_ms: float, pin: bool) -> Iterator[str]:
    """bench/emulated_engine.py (a GPU-like engine: fixed step time, no CPU for the steps) in a child
    process, on CPU 0 with `pin`; yields its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "bench.emulated_engine", str(port), str(step_ms / 1000)]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent,
                            preexec_fn=(lambda: os.sched_setaffinity(0, {0})) if pin else None)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, "bench/emulated_engine.py")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 (default, the embedded model), tiny or a dir; "
                        "with --engine emulated only a dir counts (as the gateway's), else tiny is built")  # fmt: skip
    parser.add_argument("--engine", choices=("vllm", "emulated"), default="vllm",
                        help="emulated: bench/emulated_engine.py in place of vLLM (a GPU host's shape)")  # fmt: skip
    parser.add_argument("--step-ms", type=float, default=20.0, help="the emulated engine's step time")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--blocks", type=int, default=0, help="per concurrency (default: every order twice)")
    parser.add_argument("--requests-per-slot", type=int, default=2, help="requests per round = concurrency x this")
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--no-logging", action="store_true", help="gateway with the event store off")
    parser.add_argument("--pin", action="store_true",
                        help="vLLM (or emulated engine) on CPU 0; gateway, hop, load generator on CPU 1")  # fmt: skip
    parser.add_argument("--hop", action="store_true", help="add the bare-proxy arm (bench/hop_proxy.py)")
    parser.add_argument("--relay", action="store_true", help="add the TCP-relay arm (bench/tcp_relay.py)")
    add_vllm_url(parser)
    args = parser.parse_args()
    if args.vllm_url and args.engine == "emulated":
        parser.error("--vllm-url and --engine emulated both name the engine: give one")
    cache = Path("~/.cache/loraloop/models").expanduser()
    os.environ.setdefault("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "120")  # see compare(): longer than the client's
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("--pin needs two CPUs")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        settings = {"model": args.model, "model_cache_dir": str(cache), "aliases": {"bench": {}},
                    "store": {"enabled": not args.no_logging, "root": str(Path(tmp) / "events")}}  # fmt: skip
        if args.engine == "emulated":
            direct = stack.enter_context(emulated_engine(args.step_ms, args.pin))
            settings["model"] = model_dir(args.model if Path(args.model).is_dir() else None, Path(tmp))
            settings["backends"] = {"mode": "remote", "urls": [direct], "health_interval_s": 1}
        elif args.vllm_url:  # someone else's vLLM: --pin can place only this side
            direct = args.vllm_url.rstrip("/")
            settings["backends"] = {"mode": "remote", "urls": [direct], "health_interval_s": 1}
        elif args.pin:
            direct = stack.enter_context(pinned_vllm(args.model, cache, Path(tmp) / "vllm.log"))
            settings["backends"] = {"mode": "remote", "urls": [direct], "health_interval_s": 1}
        else:
            vport = free_port()
            direct = f"http://127.0.0.1:{vport}"
            settings["backends"] = {"managed": {"port": vport, "max_model_len": 1024}}
        if args.pin:
            os.sched_setaffinity(0, {1})  # this process, and the gateway and hop started from it
        gateway = stack.enter_context(gateway_process(settings, Path(tmp)))
        urls = {"direct": (direct, "base"), "direct again": (direct, "base"), "gateway": (gateway, "bench")}
        if args.hop:
            urls["hop"] = (stack.enter_context(hop_process(direct, "base")), "bench")
        if args.relay:  # bytes only: the model name is not rewritten, so it asks for vLLM's name
            urls["relay"] = (stack.enter_context(relay_process(direct)), "base")
        asyncio.run(compare(urls, args))


def hop_process(upstream: str, model: str) -> contextlib.AbstractContextManager[str]:
    """bench/hop_proxy.py in a child process (on the CPUs of this one); yields its URL."""
    return _proxy_process("hop_proxy.py", upstream, model)


def relay_process(upstream: str) -> contextlib.AbstractContextManager[str]:
    """bench/tcp_relay.py in a child process (on the CPUs of this one); yields its URL."""
    host, port = upstream.removeprefix("http://").rsplit(":", 1)
    return _proxy_process("tcp_relay.py", host, port)


@contextlib.contextmanager
def _proxy_process(script: str, *args: str) -> Iterator[str]:
    """`bench/<script> PORT *args` in a child process; yields its URL once it accepts connections."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name(script)), str(port), *args])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench/{script} did not start")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
