"""Memory of a vLLM server across adapter load/unload cycles (vLLM#54839, #42207 report leaks).

Starts the gateway with a managed vLLM (tiny model), then N times registers an adapter (vLLM load)
and unregisters it (vLLM unload), sampling the resident memory (RSS and USS) of the whole vLLM
process family after each cycle. Prints the growth per cycle from a least-squares fit.
Run: `python bench/adapter_memory.py [--cycles 50] [--distinct] [--model DIR] [--vllm-url URL]` (`--model`: the
tiny model already built; `--vllm-url`: a running vLLM server on this host, serving it with LoRA on, instead of
the gateway's own).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ADMIN, KEY, add_model, add_vllm_url, backends, gateway_process, model_dir, pid_listening_on


def family_memory(processes: list[psutil.Process]) -> tuple[float, float]:
    """(RSS, USS) in MiB of these processes and all their children."""
    rss = uss = 0.0
    for p in {q for root in processes for q in [root, *root.children(recursive=True)]}:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss
        uss += info.uss
    return rss / 2**20, uss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--distinct", action="store_true", help="a new adapter name every cycle")
    add_model(parser)
    add_vllm_url(parser)
    args = parser.parse_args()

    from tests.adapter_factory import make_label_adapter

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = model_dir(args.model, tmp)
        make_label_adapter(Path(base), tmp / "adapters" / "cycler", "alpha", rank=16, steps=5)
        settings = {
            "model": str(base), "adapter_root": str(tmp / "adapters"), "state_dir": str(tmp / "state"),
            "model_cache_dir": str(tmp / "cache"), "aliases": {"base": {}},
            "backends": backends(args.vllm_url, max_model_len=512),
        }  # fmt: skip
        with gateway_process(settings, tmp) as url:
            if args.vllm_url:
                vllm = [psutil.Process(pid_listening_on(args.vllm_url))]
            else:  # the gateway's children: its managed vLLM (the gateway itself is not counted)
                gateway = next(p for p in psutil.Process().children() if "deploy.cli" in " ".join(p.cmdline()))
                vllm = gateway.children()
            admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
            user = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
            body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            user.post("/v1/chat/completions", json=body).raise_for_status()
            time.sleep(2)
            rss0, uss0 = family_memory(vllm)
            samples = []
            for i in range(args.cycles):
                name = f"cycler-{i}" if args.distinct else "cycler"
                admin.post("/admin/adapters", json={"name": name, "path": "cycler"}).raise_for_status()
                admin.delete(f"/admin/adapters/{name}").raise_for_status()
                samples.append(family_memory(vllm))
            rss = np.array([s[0] for s in samples])
            uss = np.array([s[1] for s in samples])
            x = np.arange(1, args.cycles + 1)
            rss_slope = np.polyfit(x, rss, 1)[0]
            uss_slope = np.polyfit(x, uss, 1)[0]
            print(f"{args.cycles} load/unload cycles ({'distinct names' if args.distinct else 'same name'}):")
            print(
                f"  RSS {rss0:.0f} -> {rss[-1]:.0f} MiB ({rss[-1] - rss0:+.1f}), fit {rss_slope * 1024:+.0f} KiB/cycle"
            )
            print(
                f"  USS {uss0:.0f} -> {uss[-1]:.0f} MiB ({uss[-1] - uss0:+.1f}), fit {uss_slope * 1024:+.0f} KiB/cycle"
            )


if __name__ == "__main__":
    main()
