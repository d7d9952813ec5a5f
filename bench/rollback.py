"""`loraloop rollback` against a bare repoint, through a real gateway and vLLM (tiny model, two trained label
adapters), rounds interleaved in one run.

A rollback is what an operator runs when a new champion misbehaves: read the settings and the registry,
find the previous champion, register it with the gateway again (it stays registered, so this only reloads
it), repoint the alias, record both transitions. Measured here, not asserted in a test (a loaded machine
makes a wall-clock bound pass or fail by luck): the time from the call (`deploy.cli.main`, in this process)
to the first request answered by the reinstated adapter (the output is checked, not a header), and, as the
baseline of the same run, the same for a bare repoint through the admin API. Each round first makes a
fresh copy of the `bravo` adapter the champion (the `alpha` champion is retired), then rolls back to
`alpha`. Prints the medians and their ratio.

Run: `python bench/rollback.py [--rounds 5] [--model DIR] [--vllm-url URL]` (`--vllm-url`: a running vLLM
server serving the tiny model with LoRA on, instead of the gateway's own).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ADMIN, KEY, add_model, add_vllm_url, backends, gateway_process, model_dir

ALIAS = "rb"  # the alias rolled back (registry versions rb-v1, rb-v2, ...)
SWITCH = "switch"  # the alias repointed by hand, for the baseline


def answer(client: httpx.Client, alias: str) -> str:
    body = {"model": alias, "messages": [{"role": "user", "content": "Label this review."}], "temperature": 0,
            "max_tokens": 8}  # fmt: skip
    resp = client.post("/v1/chat/completions", json=body)
    resp.raise_for_status()
    return str(resp.json()["choices"][0]["message"]["content"])


def until_served(client: httpx.Client, alias: str, label: str, action: Callable[[], object]) -> tuple[float, float]:
    """Run `action`; seconds until it returned and until the first request to `alias` answered `label`."""
    start = time.perf_counter()
    action()
    returned = time.perf_counter() - start
    deadline = time.monotonic() + 120
    while answer(client, alias) != label:
        if time.monotonic() > deadline:
            raise SystemExit(f"{alias} did not answer {label!r} within 120 s")
    return returned, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rollbacks (and as many bare repoints) timed")
    add_model(parser)
    add_vllm_url(parser)
    args = parser.parse_args()

    from core.registry import Registry, RegistryConfig
    from deploy.cli import main as loraloop
    from tests.adapter_factory import make_label_adapter

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = model_dir(args.model, tmp)
        root = tmp / "adapters"
        for label in ("alpha", "bravo"):
            make_label_adapter(Path(base), root / label, label)
        store, registry_path = tmp / "events", tmp / "registry.duckdb"
        settings = {
            "model": base, "adapter_root": str(root), "state_dir": str(tmp / "state"),
            "model_cache_dir": str(tmp / "cache"), "store": {"root": str(store)},
            "adapters": {"alpha": {"path": "alpha"}, "bravo": {"path": "bravo"}},
            "backends": backends(args.vllm_url, max_model_len=512),
            "aliases": {SWITCH: {"adapter": "alpha"}, ALIAS: {}},
        }  # fmt: skip
        with gateway_process(settings, tmp) as url:
            config = tmp / "cli.yaml"
            config.write_text(yaml.safe_dump({
                "model": base, "aliases": {ALIAS: {}}, "adapter_root": str(root), "registry_path": str(registry_path),
                "store": {"root": str(store)}, "promotion": {"gateway_urls": [url]},
            }))  # fmt: skip
            os.environ["LORALOOP_ADMIN_KEY"] = ADMIN
            registry = Registry(RegistryConfig(path=registry_path, adapter_root=root))
            admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
            user = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)

            def champion(label: str) -> None:
                """A new version of ALIAS (a copy of the label's adapter) becomes champion and is served."""
                version, _ = registry.next_version(ALIAS)
                path = shutil.copytree(root / label, root / version)
                registry.register_candidate(ALIAS, path, base_model=base, version=version)
                registry.transition(version, "champion", actor="bench", reason="bench round")
                admin.post("/admin/adapters", json={"name": version, "path": str(path)}).raise_for_status()
                admin.put(f"/admin/aliases/{ALIAS}", json={"adapter": version}).raise_for_status()

            def repoint(target: str) -> None:
                admin.put(f"/admin/aliases/{SWITCH}", json={"adapter": target}).raise_for_status()

            def rollback() -> None:
                with contextlib.redirect_stdout(io.StringIO()) as out:  # one result line, not one per round
                    code = loraloop(["--config", str(config), "rollback", ALIAS, "--reason", "bench"])
                if code != 0 or not out.getvalue().startswith(f"{ALIAS} now serves "):
                    raise SystemExit(f"loraloop rollback failed ({code}): {out.getvalue()}")

            champion("alpha")
            repoints, rollbacks, calls = [], [], []
            for i in range(args.rounds):
                target = "bravo" if i % 2 == 0 else "alpha"
                repoints.append(until_served(user, SWITCH, target, partial(repoint, target))[1])
                champion("bravo")
                until_served(user, ALIAS, "bravo", lambda: None)
                call, served = until_served(user, ALIAS, "alpha", rollback)
                calls.append(call)
                rollbacks.append(served)
            r, b, c = (statistics.median(x) * 1000 for x in (repoints, rollbacks, calls))
            print(f"over {args.rounds} rounds: bare repoint -> first request served by the new adapter p50 {r:.0f} ms; "
                  f"loraloop rollback -> first request served by the reinstated adapter p50 {b:.0f} ms "
                  f"(the call itself {c:.0f} ms); rollback / repoint ratio {b / r:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
