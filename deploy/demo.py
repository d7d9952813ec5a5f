"""`loraloop demo`: the whole loop, for real, on this machine.

vLLM and the gateway start; simulated users with a hidden preference — product reviews answered with a
single house label, `LIKED` or `DISLIKED`, which the base model never does — send requests and feedback
through the OpenAI API; the nightly cycle retrains a candidate from that feedback, gates it, and starts a
canary; the canary runs on real traffic and feedback (one simulated day per round) until the controller
promotes it; a final report shows the preferred-answer rate on held-out reviews before and after, with
plots. `--aa`: the candidate is indistinguishable from the champion (a zero-delta adapter) and users
rate at random — the controller must promote nothing.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import shutil
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml

from core import paths
from core.progress import progress, progress_iter
from core.registry import Registry, RegistryConfig
from core.settings import Settings
from deploy.admin_client import GatewayFleet
from retrain.models.prepare import prepare_model

from .controller import CANARY_PREFIX, PromotionController
from .cycle import run_cycle
from .local import LocalGateway, start_local_gateway

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent

_GOOD = ["love", "really like", "am delighted with", "adore", "am impressed by", "enjoy", "recommend"]
_BAD = ["hate", "regret buying", "am disappointed by", "can't stand", "returned", "dislike", "gave up on"]
_TRAIN_THINGS = ["this blender", "the headphones", "my new phone", "the sofa", "this kettle", "the backpack",
                 "these shoes", "the lamp", "this camera", "the vacuum", "the keyboard", "this tent"]  # fmt: skip
_HOLDOUT_THINGS = ["the toaster", "this jacket", "the monitor", "these speakers", "the mattress", "this watch"]
_REASONS = ["", " It works well.", " Worth the money.", " Shipping was fast.", " Not what I expected.", " Meh."]


@dataclass
class DemoConfig:
    """Knobs of the demo; the defaults finish in under 15 minutes on 2 CPU cores."""

    preset: str = "smollm2"
    aa: bool = False
    workdir: Path = paths.STATE_ROOT / "demo"
    alias: str = "reviews"
    users: int = 40
    baseline_requests: int = 160
    rounds: int = 6
    round_requests: int = 64
    holdout: int = 40
    seed: int = 0
    concurrency: int = 8
    vllm_url: str | None = None  # use a running vLLM (remote mode) instead of starting one


@dataclass
class DemoResult:
    before_rate: float
    after_rate: float
    promoted: str | None
    decisions: list[dict[str, Any]] = field(default_factory=list)
    report_path: Path | None = None
    elapsed_s: float = 0.0


def review(rng: random.Random, things: list[str]) -> tuple[str, str]:
    good = rng.random() < 0.5
    text = f"I {rng.choice(_GOOD if good else _BAD)} {rng.choice(things)}.{rng.choice(_REASONS)}"
    return text, "LIKED" if good else "DISLIKED"


def prompt_messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Review: {text}\nWhat is the verdict on this review?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _recipe(cfg: DemoConfig, model_path: str, workdir: Path) -> Path:
    """The SFT recipe the cycle runs, adjusted to the preset."""
    recipe = yaml.safe_load((REPO / "recipes" / "sft_lora.yaml").read_text())
    recipe["model"]["base"] = model_path
    recipe["output"]["runs_dir"] = str(workdir / "runs")
    recipe["eval"].update({"max_tokens": 6, "min_slice_samples": 5})
    recipe["data"]["prepare"] = {"min_rows": 20}
    if cfg.preset == "smollm2":  # a real model: gentler learning rate, fewer steps
        recipe["train"].update({"learning_rate": 1.0e-3, "max_steps": 30, "batch_size": 8, "torch_threads": None})
        recipe["lora"].update({"r": 8, "alpha": 16})
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _settings(cfg: DemoConfig, model_path: str, workdir: Path) -> Settings:
    api, admin = "sk-demo-" + secrets.token_hex(12), "adm-demo-" + secrets.token_hex(12)
    backends: dict[str, Any] = {"mode": "managed", "health_interval_s": 1.0,
                                "managed": {"port": _free_port(), "max_model_len": 1024}}  # fmt: skip
    if cfg.vllm_url:
        backends = {"mode": "remote", "urls": [cfg.vllm_url], "health_interval_s": 1.0}
    port = _free_port()
    return Settings(
        model=model_path, model_cache_dir=workdir / "cache", port=port, api_key=api, admin_key=admin,
        adapter_root=workdir / "adapters", state_dir=workdir / "state", registry_path=workdir / "registry.duckdb",
        replica_id="demo", backends=backends,
        aliases={cfg.alias: {"defaults": {"temperature": 0.0, "max_tokens": 6}}},
        # export_lag_s 0: a simulated day's traffic is complete (and flushed) when its cycle runs
        store={"root": str(workdir / "events"), "flush_interval_s": 0.05, "export_lag_s": 0},
        cycle={"state_dir": str(workdir / "cycle"),
               "aliases": {cfg.alias: {"recipe": str(_recipe(cfg, model_path, workdir)), "min_new_rows": 20}}},
        promotion={"gateway_urls": [f"http://127.0.0.1:{port}"], "ramp": [0.5], "min_samples": 40,
                   "step_min_requests": 20, "certainty": 0.95, "max_duration_h": 24.0 * cfg.rounds - 1},
    )  # fmt: skip


class Users:
    """Simulated users: each has an id (sticky A/B arm) and the hidden preference for the house label."""

    def __init__(self, gateway: LocalGateway, cfg: DemoConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        key = gateway.settings.api_key.get_secret_value() if gateway.settings.api_key else None
        self.client = gateway.client(key, limits=httpx.Limits(max_connections=cfg.concurrency * 2))

    def ask(self, user: str, text: str) -> tuple[str, str, dict[str, str]]:
        body = {"model": self.cfg.alias, "user": user, "messages": prompt_messages(text)}
        resp = self.client.post("/v1/chat/completions", json=body)
        resp.raise_for_status()
        return resp.json()["id"], resp.json()["choices"][0]["message"]["content"] or "", dict(resp.headers)

    def session(self, n: int, desc: str) -> dict[str, list[int]]:
        """`n` requests from random users, each followed by feedback; returns hits per arm."""
        jobs = [(f"user-{self.rng.randrange(self.cfg.users)}", *review(self.rng, _TRAIN_THINGS)) for _ in range(n)]
        rolls = [self.rng.random() for _ in range(n)]
        hits: dict[str, list[int]] = {}

        def one(job: tuple[str, str, str], roll: float) -> None:
            user, text, label = job
            rid, answer, headers = self.ask(user, text)
            good = answer.strip() == label
            liked = roll < 0.3 if self.cfg.aa else good  # A/A: the users' ratings carry no preference
            fb: dict[str, Any] = {"request_id": rid, "kind": "thumbs", "value": liked, "user": user,
                                  "metadata": {"task": "review", "label": label}}  # fmt: skip
            self.client.post("/v1/feedback", json=fb).raise_for_status()
            if not liked and not self.cfg.aa and roll < 0.6:  # some users also type what they wanted
                correction = {**fb, "kind": "correction", "value": label}
                self.client.post("/v1/feedback", json=correction).raise_for_status()
            hits.setdefault(headers.get("x-loraloop-arm", "-"), []).append(int(good))

        with ThreadPoolExecutor(self.cfg.concurrency) as pool, progress(n, desc, "req") as bar:
            for fut in [pool.submit(one, j, r) for j, r in zip(jobs, rolls, strict=True)]:
                fut.result()
                bar.update()
        return hits

    def preferred_rate(self, desc: str) -> float:
        """Preferred-answer rate on held-out reviews (products never seen in training traffic)."""
        rng = random.Random(self.cfg.seed + 1)
        items = [review(rng, _HOLDOUT_THINGS) for _ in range(self.cfg.holdout)]
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            asked = pool.map(lambda it: self.ask("holdout-eval", it[0])[1], items)
            answers = list(progress_iter(asked, len(items), desc, "req"))
        return statistics.mean(int(a.strip() == label) for a, (_, label) in zip(answers, items, strict=True))


def _zero_delta_candidate(settings: Settings, model_path: str, alias: str) -> str:
    """A/A: a candidate identical to the base (LoRA B = 0), registered like a trained one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    registry = Registry(RegistryConfig(path=settings.registry_path, adapter_root=settings.adapter_root))
    version, _ = registry.next_version(alias)
    out = settings.adapter_root / version
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(str(out), safe_serialization=True)
    cfg_path = out / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = model_path
    cfg_path.write_text(json.dumps(data, indent=2))
    registry.register_candidate(alias, str(out), base_model=model_path, version=version, actor="demo",
                                reason="A/A: zero-delta copy of the base")  # fmt: skip
    return version


def run_demo(cfg: DemoConfig) -> DemoResult:
    started = time.monotonic()
    workdir = cfg.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    print(f"[1/6] preparing the {cfg.preset} base model ...", flush=True)
    model_path = prepare_model(cfg.preset, paths.MODEL_CACHE_DIR.expanduser())
    settings = _settings(cfg, model_path, workdir)
    print(f"[2/6] starting vLLM and the gateway on {settings.port} (about a minute) ...", flush=True)
    gateway = start_local_gateway(settings, model_path if settings.backends.mode == "managed" else None)
    try:
        users = Users(gateway, cfg)
        before = users.preferred_rate("held-out reviews, base model")
        print(f"      preferred-answer rate before: {before:.0%}", flush=True)
        print(f"[3/6] {cfg.baseline_requests} requests from {cfg.users} users, with feedback ...", flush=True)
        users.session(cfg.baseline_requests, "baseline traffic")
        gateway.app.state.store.flush()
        registry = Registry(RegistryConfig(path=settings.registry_path, adapter_root=settings.adapter_root))
        key = settings.admin_key.get_secret_value() if settings.admin_key else ""
        controller = PromotionController(registry, GatewayFleet([gateway.url], key), settings.store.root,
                                         settings.promotion, actor="demo")  # fmt: skip
        print("[4/6] nightly cycle: export → clean → train LoRA → gate → canary ...", flush=True)
        if cfg.aa:
            controller.start_canary(_zero_delta_candidate(settings, model_path, cfg.alias))
        else:
            cycle = run_cycle(settings)
            for line in cycle.actions.get(cfg.alias, []):
                print(f"      {line}", flush=True)
            if cycle.failed:
                raise RuntimeError(f"the cycle failed: {cycle.failed}")
        exp = controller.running_canary(cfg.alias)
        decisions: list[dict[str, Any]] = []
        promoted = None
        print(f"[5/6] canary on real traffic, one simulated day per round (max {cfg.rounds}) ...", flush=True)
        for day in range(1, cfg.rounds + 1):
            if exp is None:
                break
            hits = users.session(cfg.round_requests, f"day {day}")
            gateway.app.state.store.flush()
            decision = controller.evaluate(cfg.alias, now=exp.start + timedelta(days=day))
            assert decision is not None
            arms = {arm: f"{sum(h)}/{len(h)} preferred" for arm, h in sorted(hits.items())}
            print(f"      day {day}: {decision.action} — {decision.reason} {arms}", flush=True)
            decisions.append({"day": day, "action": decision.action, "reason": decision.reason,
                              "figures": decision.figures})  # fmt: skip
            if decision.action == "promote":
                promoted = exp.arm("candidate").adapter
            if decision.action in ("promote", "rollback", "timeout"):
                break
        if exp is not None and controller.running_canary(cfg.alias) is not None:
            controller.fleet.stop_experiment(exp.id)  # out of rounds: the champion stays
        after = users.preferred_rate("held-out reviews, alias now")
        print(f"[6/6] preferred-answer rate: before {before:.0%} → after {after:.0%}; "
              f"promoted: {promoted or 'nothing'}", flush=True)  # fmt: skip
        result = DemoResult(before, after, promoted, decisions, elapsed_s=time.monotonic() - started)
        result.report_path = write_report(workdir, cfg, result, registry, exp.id if exp else None, settings)
        print(f"      report: {result.report_path}  ({result.elapsed_s / 60:.1f} min)", flush=True)
        return result
    finally:
        gateway.stop()


def write_report(
    workdir: Path, cfg: DemoConfig, result: DemoResult, registry: Registry, exp_id: str | None, settings: Settings
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from feedback.plot import write_plot
    from feedback.report import build_report

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(["before (base)", "after"], [result.before_rate, result.after_rate], color=["#999", "#2a7"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("preferred-answer rate (held-out)")
    ax.set_title(f"loraloop demo ({cfg.preset}{', A/A' if cfg.aa else ''})")
    fig.tight_layout()
    fig.savefig(workdir / "before_after.png", dpi=100)
    plt.close(fig)
    lines = [f"# loraloop demo — {cfg.preset}{' (A/A)' if cfg.aa else ''}", "",
             f"- preferred-answer rate on {cfg.holdout} held-out reviews: before **{result.before_rate:.0%}**, "
             f"after **{result.after_rate:.0%}**", f"- promoted: **{result.promoted or 'nothing'}**",
             f"- time: {result.elapsed_s / 60:.1f} min", "", "![before/after](before_after.png)", ""]  # fmt: skip
    if exp_id is not None:
        report = build_report(settings.store.root, exp_id)
        write_plot(report, workdir / "canary.png")
        lines += ["## Canary", "", "```", report.to_table(), "```", "", "![canary](canary.png)", ""]
    lines += ["## Decisions", ""] + [f"- day {d['day']}: {d['action']} — {d['reason']}" for d in result.decisions]
    lines += ["", "## Registry audit log", ""]
    lines += [f"- {e['version']}: {e['from_status'] or '-'} → {e['to_status']} ({e['actor']}: {e['reason']})"
              for e in registry.audit(cfg.alias)]  # fmt: skip
    path = workdir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def cmd_demo(args: Any) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU kernels it cannot find: noise
    default_dir = paths.STATE_ROOT / f"demo-{args.preset}{'-aa' if args.aa else ''}"
    cfg = DemoConfig(preset=args.preset, aa=args.aa, workdir=Path(args.workdir) if args.workdir else default_dir)
    result = run_demo(cfg)
    ok = result.promoted is None if cfg.aa else (result.promoted is not None and result.after_rate > result.before_rate)
    print("demo " + ("succeeded" if ok else "did not reach the expected outcome"))
    return 0 if ok else 1


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the whole loop on this machine (real vLLM, real training)")
    p.add_argument("--preset", choices=["smollm2", "tiny"], default="smollm2", help="base model (tiny: fast run)")
    p.add_argument("--aa", action="store_true", help="A/A mode: no real difference between arms")
    p.add_argument("--workdir", help="where everything is written (default ./.loraloop/demo-PRESET)")
    p.set_defaults(func=cmd_demo)


__all__ = ["CANARY_PREFIX", "DemoConfig", "DemoResult", "run_demo"]
