"""The gateway's added latency with event logging on (durable, the default) vs off (`store.enabled:
false`), both in front of the same vLLM CPU server (tiny model), requests interleaved one by one so
both sides see the same machine. Called from bench/store.py; runnable alone:
`python bench/store_gateway.py [--requests 200] [--vllm-url URL] [--model DIR]` (a running vLLM server,
serving the tiny model, instead of starting one; the tiny model already built)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import KEY, add_model, add_vllm_url, free_port, gateway_processes, model_dir, wait_healthy
from core.serving_config import ManagedBackendConfig
from serving.managed import vllm_command, vllm_env

VARIANTS: dict[str, dict[str, bool]] = {
    "off": {"enabled": False},
    "on, durable": {"enabled": True, "durable_requests": True},
    "on, async": {"enabled": True, "durable_requests": False},
}


@contextlib.contextmanager
def vllm_server(base: Path, tmp: Path) -> Iterator[str]:
    """A vLLM CPU server for `base`, one for all the gateways (not managed by any); yields its URL."""
    vport = free_port()
    cfg = ManagedBackendConfig(port=vport, max_model_len=512)
    cmd, env = vllm_command(str(base), "base", cfg, "cpu"), vllm_env(cfg, "cpu")
    with (tmp / "vllm.log").open("wb") as log:
        vllm = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{vport}", vllm, "vLLM", tmp / "vllm.log")
        yield f"http://127.0.0.1:{vport}"
    finally:
        os.killpg(vllm.pid, signal.SIGTERM)
        vllm.wait(timeout=60)


def run(requests: int, tmp: Path, vllm_url: str | None = None, model: str | None = None) -> dict[str, float]:
    """Median latency in ms per variant."""
    base = Path(model_dir(model, tmp))
    with contextlib.ExitStack() as stack:
        if vllm_url is None:
            vllm_url = stack.enter_context(vllm_server(base, tmp))
        slugs = {name: name.replace(", ", "-") for name in VARIANTS}  # for file names
        by_slug = stack.enter_context(gateway_processes({slugs[name]: {
            "model": str(base), "replica_id": f"bench-{slugs[name]}", "state_dir": str(tmp / f"state-{slugs[name]}"),
            "store": {"root": str(tmp / "events"), **store},
            "backends": {"mode": "remote", "urls": [vllm_url]},
            "aliases": {"bench": {"defaults": {"max_tokens": 16, "temperature": 0}}},
        } for name, store in VARIANTS.items()}, tmp))  # fmt: skip
        urls = {name: by_slug[slug] for name, slug in slugs.items()}
        clients = {n: httpx.Client(base_url=u, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
                   for n, u in urls.items()}  # fmt: skip
        body = {"model": "bench", "messages": [{"role": "user", "content": "Is this review positive?"}],
                "ignore_eos": True}  # fmt: skip
        lat: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for i in range(requests + 10):
            order = list(VARIANTS) if i % 2 else list(reversed(VARIANTS))
            for name in order:
                t0 = time.perf_counter()
                clients[name].post("/v1/chat/completions", json=body).raise_for_status()
                if i >= 10:  # warm-up
                    lat[name].append(time.perf_counter() - t0)
        return {name: statistics.median(values) * 1000 for name, values in lat.items()}


def report(requests: int, vllm_url: str | None = None, model: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        r = run(requests, Path(tmp), vllm_url, model)
    off = r["off"]
    for name in ("on, durable", "on, async"):
        print(f"gateway latency, logging {name} vs off: median {r[name]:.2f} ms vs {off:.2f} ms over {requests} "
              f"interleaved requests: {(r[name] / off - 1) * 100:+.2f} % (target <= +1 %)")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    add_vllm_url(parser)
    add_model(parser)
    args = parser.parse_args()
    report(args.requests, args.vllm_url, args.model)
