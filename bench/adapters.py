"""Adapters at runtime, measured through a real gateway and vLLM (tiny model, trained label adapters):

1. repoint latency: time from the repoint call to the first request served by the new adapter
   (the output is checked, not a header); target <= 1 s here;
2. throughput of a load mixing 4 adapters (4 aliases, one adapter each) against the same load on
   the base alone, same concurrency, rounds interleaved: prints the ratio.

Run: `python bench/adapters.py [--switches 10] [--rounds 3] [--concurrency 8] [--model DIR] [--vllm-url URL]`
(`--model`: the tiny model already built; `--vllm-url`: a running vLLM server serving it with LoRA on and
--max-loras >= 4, instead of the gateway's own).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ADMIN, KEY, add_model, add_vllm_url, backends, gateway_process, model_dir

LABELS = ("alpha", "bravo", "charlie", "delta")
# only the repoint check reads answers (alpha <-> bravo); the mixed load sends ignore_eos requests of a fixed
# length, whose cost is the same whatever the adapters' weights: charlie and delta stay untrained (saves
# 2 x ~11 s of training here)
TRAINED = ("alpha", "bravo")


def chat(client: httpx.Client, alias: str, max_tokens: int = 8, ignore_eos: bool = False) -> tuple[str, int]:
    body = {"model": alias, "messages": [{"role": "user", "content": "Label this review."}], "temperature": 0,
            "max_tokens": max_tokens, "ignore_eos": ignore_eos}  # fmt: skip
    resp = client.post("/v1/chat/completions", json=body)
    resp.raise_for_status()
    data = resp.json()
    return data["choices"][0]["message"]["content"], data["usage"]["completion_tokens"]


def throughput(url: str, aliases: list[str], requests: int, concurrency: int) -> float:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as client:
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            tokens = sum(
                pool.map(lambda i: chat(client, aliases[i % len(aliases)], 48, ignore_eos=True)[1], range(requests))
            )
        return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--switches", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    add_model(parser)
    add_vllm_url(parser)
    args = parser.parse_args()

    from tests.adapter_factory import make_label_adapter

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = model_dir(args.model, tmp)
        for label in LABELS:
            make_label_adapter(Path(base), tmp / "adapters" / label, label, steps=60 if label in TRAINED else 0)
        aliases = {f"mix-{label}": {"adapter": label} for label in LABELS}
        settings = {
            "model": str(base), "adapter_root": str(tmp / "adapters"), "state_dir": str(tmp / "state"),
            "model_cache_dir": str(tmp / "cache"), "adapters": {label: {"path": label} for label in LABELS},
            "backends": backends(args.vllm_url, max_model_len=512, max_loras=4),
            "aliases": {"base": {}, "switch": {"adapter": "alpha"}, **aliases},
        }  # fmt: skip
        with gateway_process(settings, tmp) as url:
            admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
            user = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
            latencies = []
            for i in range(args.switches):
                target = "bravo" if i % 2 == 0 else "alpha"
                start = time.perf_counter()
                admin.put("/admin/aliases/switch", json={"adapter": target}).raise_for_status()
                while chat(user, "switch")[0] != target:
                    pass
                latencies.append(time.perf_counter() - start)
                time.sleep(0.5)  # let the old adapter drain and unload, as in production
            print(f"repoint -> first request served by the new adapter over {args.switches} switches: "
                  f"p50 {statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
                  f"(target <= 1000 ms)")  # fmt: skip
            mixed_aliases = list(aliases)
            throughput(url, mixed_aliases, args.concurrency, args.concurrency)  # warm-up
            base_tps, mixed_tps = [], []
            for _ in range(args.rounds):
                base_tps.append(throughput(url, ["base"], args.concurrency * 4, args.concurrency))
                mixed_tps.append(throughput(url, mixed_aliases, args.concurrency * 4, args.concurrency))
            b, m = statistics.median(base_tps), statistics.median(mixed_tps)
            print(f"throughput at concurrency {args.concurrency}: base alone {b:.1f} tok/s, "
                  f"4 adapters mixed {m:.1f} tok/s, ratio {m / b:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
