"""The gateway's added latency with event logging on (durable, the default) vs off (`store.enabled:
false`), both in front of the same vLLM CPU server (tiny model), requests interleaved one by one so
both sides see the same machine. Called from bench/store.py; runnable alone:
`python bench/store_gateway.py [--requests 200]`."""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serving import KEY, free_port
from serving.managed import vllm_command, vllm_env
from serving.model_prep import build_tiny
from serving.settings import ManagedBackendConfig


def _wait(url: str, proc: subprocess.Popen[bytes], what: str, log: Path | None = None) -> None:
    for _ in range(900):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(1)
    tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
    raise SystemExit(f"{what} did not start\n{tail}")


VARIANTS: dict[str, dict[str, bool]] = {
    "off": {"enabled": False},
    "on, durable": {"enabled": True, "durable_requests": True},
    "on, async": {"enabled": True, "durable_requests": False},
}


def run(requests: int, tmp: Path) -> dict[str, float]:
    """Median latency in ms per variant."""
    base = build_tiny(tmp / "tiny")
    vport = free_port()
    cfg = ManagedBackendConfig(port=vport, max_model_len=512)
    log = (tmp / "vllm.log").open("wb")
    cmd, env = vllm_command(str(base), "base", cfg, "cpu"), vllm_env(cfg, "cpu")
    vllm = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    gateways: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    try:
        _wait(f"http://127.0.0.1:{vport}", vllm, "vLLM")
        for name, store in VARIANTS.items():
            port = free_port()
            slug = name.replace(", ", "-")
            conf = tmp / f"{slug}.yaml"
            conf.write_text(yaml.safe_dump({
                "model": str(base), "port": port, "log_level": "warning", "replica_id": f"bench-{slug}",
                "state_dir": str(tmp / f"state-{slug}"), "store": {"root": str(tmp / "events"), **store},
                "backends": {"mode": "remote", "urls": [f"http://127.0.0.1:{vport}"]},
                "aliases": {"bench": {"defaults": {"max_tokens": 16, "temperature": 0}}},
            }))  # fmt: skip
            env = {**os.environ, "LORALOOP_API_KEY": KEY}
            proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "--config", str(conf), "serve"], env=env,
                                    stdout=(tmp / f"{name}.log").open("wb"), stderr=subprocess.STDOUT)  # fmt: skip
            gateways[name] = (proc, f"http://127.0.0.1:{port}")
            _wait(gateways[name][1], proc, f"gateway ({name})", tmp / f"{name}.log")
        clients = {n: httpx.Client(base_url=u, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
                   for n, (_, u) in gateways.items()}  # fmt: skip
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
    finally:
        for proc, _ in gateways.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        os.killpg(vllm.pid, signal.SIGTERM)
        vllm.wait(timeout=60)


def report(requests: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        r = run(requests, Path(tmp))
    off = r["off"]
    for name in ("on, durable", "on, async"):
        print(f"gateway latency, logging {name} vs off: median {r[name]:.2f} ms vs {off:.2f} ms over {requests} "
              f"interleaved requests: {(r[name] / off - 1) * 100:+.2f} % (target <= +1 %)")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    report(parser.parse_args().requests)
