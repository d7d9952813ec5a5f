"""`loraloop demo`: the whole loop, for real, on this machine.

vLLM and the gateway start; simulated users with a hidden preference send requests and feedback through
the OpenAI API; the nightly cycle retrains a candidate from that feedback, gates it, and starts a canary;
the canary runs on real traffic and feedback (one simulated day per round) until the controller promotes
it; a final report shows the scenario's held-out metric before and after, with plots. `--aa`: the
candidate is indistinguishable from the champion (a zero-delta adapter) and users rate at random — the
controller must promote nothing.

What the users want is the scenario (deploy/scenarios/, `--scenario`): `reviews` (the default) — product
reviews answered with a single house label, `LIKED` or `DISLIKED`, which the base model never does;
`tools` — a support assistant's tool calls written to a house convention; `open` — open-ended answers in a
house style checked by a rubric plug-in, with the pairwise judge in the gate and the report.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import shutil
import socket
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
from core.runs import RunRecords
from core.settings import Settings
from deploy.admin_client import GatewayFleet
from retrain.models.prepare import prepare_model

from .controller import CANARY_PREFIX, PromotionController
from .cycle import run_cycle
from .local import LocalGateway, start_local_gateway
from .scenarios import SCENARIOS, Answer, Comparison, DemoEnv, Item, Scenario, get_scenario

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent

#: Knobs a scenario needs other than DemoConfig's defaults (longer answers, more traffic to learn from).
SCENARIO_KNOBS: dict[str, dict[str, Any]] = {
    "reviews": {},
    # a canary day of 96 requests gives both arms the 40 rated requests a decision needs
    "tools": {"baseline_requests": 160, "holdout": 40, "round_requests": 96},
    "open": {"baseline_requests": 160, "holdout": 24, "round_requests": 96},
}


@dataclass
class DemoConfig:
    """Knobs of the demo; the defaults finish in under 15 minutes on 2 CPU cores (`for_scenario` gives a
    scenario's own)."""

    preset: str = "smollm2"
    aa: bool = False
    workdir: Path = paths.STATE_ROOT / "demo"
    scenario: str = "reviews"
    alias: str = ""  # default: the scenario's name
    users: int = 40
    baseline_requests: int = 160
    rounds: int = 6
    round_requests: int = 64
    holdout: int = 40
    seed: int = 0
    concurrency: int = 8
    vllm_url: str | None = None  # use a running vLLM (remote mode) instead of starting one

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}; one of {', '.join(SCENARIOS)}")
        self.alias = self.alias or self.scenario

    @classmethod
    def for_scenario(cls, scenario: str, **kw: Any) -> DemoConfig:
        """The demo's defaults with the scenario's own knobs (SCENARIO_KNOBS); ``kw`` win."""
        return cls(scenario=scenario, **{**SCENARIO_KNOBS[scenario], **kw})


@dataclass
class DemoResult:
    """``before_rate`` / ``after_rate``: the scenario's held-out metric (``metrics_before`` / ``_after``: all of
    its held-out metrics); ``comparison``: what the scenario adds (the open scenario's judge); ``gate``: the
    last run's gate result."""

    before_rate: float
    after_rate: float
    promoted: str | None
    decisions: list[dict[str, Any]] = field(default_factory=list)
    report_path: Path | None = None
    elapsed_s: float = 0.0
    scenario: str = "reviews"
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    comparison: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _recipe(cfg: DemoConfig, model_path: str, workdir: Path, env: DemoEnv | None = None) -> Path:
    """The SFT recipe the cycle runs, adjusted to the preset and the scenario (``env``: where the demo's gateway
    and vLLM listen)."""
    recipe = yaml.safe_load((REPO / "recipes" / "sft_lora.yaml").read_text())
    recipe["model"]["base"] = model_path
    recipe["output"]["runs_dir"] = str(workdir / "runs")
    recipe["eval"].update({"min_slice_samples": 5})
    recipe["data"]["prepare"] = {"min_rows": 20}
    if cfg.preset == "smollm2":  # a real model: gentler learning rate, fewer steps
        recipe["train"].update({"learning_rate": 1.0e-3, "max_steps": 30, "batch_size": 8, "torch_threads": None})
        recipe["lora"].update({"r": 8, "alpha": 16})
    env = env or DemoEnv("http://127.0.0.1:8100", "http://127.0.0.1:8000")
    get_scenario(cfg.scenario, cfg.preset).tune_recipe(recipe, cfg.preset, env)
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _settings(cfg: DemoConfig, model_path: str, workdir: Path) -> Settings:
    api, admin = "sk-demo-" + secrets.token_hex(12), "adm-demo-" + secrets.token_hex(12)
    scenario = get_scenario(cfg.scenario, cfg.preset)
    managed: dict[str, Any] = {"port": _free_port(), "max_model_len": 1024}
    if scenario.tool_calling():
        managed["tool_calling"] = scenario.tool_calling()
    backends: dict[str, Any] = {"mode": "managed", "health_interval_s": 1.0, "managed": managed}
    vllm_url = f"http://127.0.0.1:{managed['port']}"
    if cfg.vllm_url:
        backends = {"mode": "remote", "urls": [cfg.vllm_url], "health_interval_s": 1.0}
        vllm_url = cfg.vllm_url.rstrip("/")
    port = _free_port()
    recipe = _recipe(cfg, model_path, workdir, DemoEnv(vllm_url, f"http://127.0.0.1:{port}"))
    return Settings(
        model=model_path, model_cache_dir=workdir / "cache", port=port, api_key=api, admin_key=admin,
        adapter_root=workdir / "adapters", state_dir=workdir / "state", registry_path=workdir / "registry.duckdb",
        replica_id="demo", backends=backends, aliases=scenario.aliases(cfg.alias),
        # export_lag_s 0: a simulated day's traffic is complete (and flushed) when its cycle runs
        store={"root": str(workdir / "events"), "flush_interval_s": 0.05, "export_lag_s": 0},
        cycle={"state_dir": str(workdir / "cycle"),
               "aliases": {cfg.alias: {"recipe": str(recipe), "min_new_rows": 20}}},
        promotion={"gateway_urls": [f"http://127.0.0.1:{port}"], "ramp": [0.5], "min_samples": 40,
                   "step_min_requests": 20, "certainty": 0.95, "max_duration_h": 24.0 * cfg.rounds - 1},
    )  # fmt: skip


def demo_env(settings: Settings) -> DemoEnv:
    """Where the demo's gateway and its vLLM (the managed one, or the first remote one) listen; the gateway's API
    key is put in the environment variable the open scenario's judge reads (``eval.judge.api_key_env``)."""
    vllm = settings.backends.urls[0] if settings.backends.mode == "remote" else (
        f"http://{settings.backends.managed.host}:{settings.backends.managed.port}")  # fmt: skip
    env = DemoEnv(vllm, f"http://{settings.host}:{settings.port}")
    if settings.api_key:
        os.environ[env.api_key_env] = settings.api_key.get_secret_value()
    return env


class Users:
    """Simulated users: each has an id (sticky A/B arm) and the scenario's hidden preference."""

    def __init__(self, gateway: LocalGateway, cfg: DemoConfig, scenario: Scenario) -> None:
        self.cfg, self.scenario = cfg, scenario
        self.rng = random.Random(cfg.seed)
        key = gateway.settings.api_key.get_secret_value() if gateway.settings.api_key else None
        self.client = gateway.client(key, limits=httpx.Limits(max_connections=cfg.concurrency * 2))

    def ask(self, user: str, item: Item) -> tuple[str, Answer, dict[str, str]]:
        body = {"model": self.cfg.alias, "user": user, "messages": item.messages, **item.extra}
        resp = self.client.post("/v1/chat/completions", json=body)
        resp.raise_for_status()
        return resp.json()["id"], Answer.from_message(resp.json()["choices"][0]["message"]), dict(resp.headers)

    def session(self, n: int, desc: str) -> dict[str, list[int]]:
        """`n` requests from random users, each followed by feedback; returns hits per arm."""
        jobs = [(f"user-{self.rng.randrange(self.cfg.users)}", self.scenario.traffic_item(self.rng)) for _ in range(n)]
        rolls = [self.rng.random() for _ in range(n)]
        hits: dict[str, list[int]] = {}

        def one(job: tuple[str, Item], roll: float) -> None:
            user, item = job
            rid, answer, headers = self.ask(user, item)
            rating = self.scenario.rate(item, answer)
            liked = roll < 0.3 if self.cfg.aa else rating.good  # A/A: the users' ratings carry no preference
            fb: dict[str, Any] = {"request_id": rid, "kind": "thumbs", "value": liked, "user": user,
                                  "metadata": item.metadata}  # fmt: skip
            self.client.post("/v1/feedback", json=fb).raise_for_status()
            # some users also type what they wanted
            if not liked and not self.cfg.aa and roll < self.scenario.correction_rate and rating.correction is not None:
                correction = {**fb, "kind": "correction", "value": rating.correction}
                self.client.post("/v1/feedback", json=correction).raise_for_status()
            hits.setdefault(headers.get("x-loraloop-arm", "-"), []).append(int(rating.good))

        with ThreadPoolExecutor(self.cfg.concurrency) as pool, progress(n, desc, "req") as bar:
            for fut in [pool.submit(one, j, r) for j, r in zip(jobs, rolls, strict=True)]:
                fut.result()
                bar.update()
        return hits

    def holdout(self, desc: str) -> tuple[list[Item], list[Answer], dict[str, float]]:
        """The scenario's held-out requests (never in the traffic), the alias's answers and their metrics."""
        items = self.scenario.holdout_items(self.cfg.holdout, self.cfg.seed)
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            asked = pool.map(lambda it: self.ask("holdout-eval", it)[1], items)
            answers = list(progress_iter(asked, len(items), desc, "req"))
        return items, answers, self.scenario.holdout_metrics(items, answers)


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


def _canary_rounds(cfg: DemoConfig, users: Users, gateway: LocalGateway, controller: PromotionController,
                   exp: Any) -> tuple[str | None, list[dict[str, Any]]]:  # fmt: skip
    """One simulated day of traffic per round, the controller deciding after each; the promoted version."""
    decisions: list[dict[str, Any]] = []
    promoted = None
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
    return promoted, decisions


def _nightly(cfg: DemoConfig, settings: Settings, model_path: str, controller: PromotionController) -> None:
    """The nightly cycle (or, A/A, a zero-delta candidate straight to the canary)."""
    if cfg.aa:
        controller.start_canary(_zero_delta_candidate(settings, model_path, cfg.alias))
        return
    cycle = run_cycle(settings)
    for line in cycle.actions.get(cfg.alias, []):
        print(f"      {line}", flush=True)
    if cycle.failed:
        raise RuntimeError(f"the cycle failed: {cycle.failed}")


def last_gate(settings: Settings, alias: str) -> dict[str, Any] | None:
    """The gate result of the alias's last run (None when no run got to the gate)."""
    records = RunRecords(settings.runs_path)
    for run in reversed(records.list(alias)):
        record = records.get(run["run_id"])
        if record and record.get("gate"):
            return dict(record["gate"])
    return None


def _pct(metrics: dict[str, float], key: str) -> str:
    return f"{metrics[key]:.0%}" if key in metrics else "-"


def run_demo(cfg: DemoConfig) -> DemoResult:
    started = time.monotonic()
    scenario = get_scenario(cfg.scenario, cfg.preset)
    workdir = cfg.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    print(f"[1/6] preparing the {cfg.preset} base model ...", flush=True)
    model_path = prepare_model(cfg.preset, paths.MODEL_CACHE_DIR.expanduser())
    settings = _settings(cfg, model_path, workdir)
    demo_env(settings)  # the judge's key, before the cycle needs it
    print(f"[2/6] starting vLLM and the gateway on {settings.port} (about a minute) ...", flush=True)
    gateway = start_local_gateway(settings, model_path if settings.backends.mode == "managed" else None)
    noun, title = scenario.holdout_noun, scenario.metric_title
    try:
        users = Users(gateway, cfg, scenario)
        items, answers_before, before = users.holdout(f"held-out {noun}, base model")
        print(f"      {title} before: {before[scenario.metric]:.0%}", flush=True)
        print(f"[3/6] {cfg.baseline_requests} requests from {cfg.users} users, with feedback ...", flush=True)
        users.session(cfg.baseline_requests, "baseline traffic")
        gateway.app.state.store.flush()
        registry = Registry(RegistryConfig(path=settings.registry_path, adapter_root=settings.adapter_root))
        key = settings.admin_key.get_secret_value() if settings.admin_key else ""
        controller = PromotionController(registry, GatewayFleet([gateway.url], key), settings.store.root,
                                         settings.promotion, actor="demo")  # fmt: skip
        print("[4/6] nightly cycle: export → clean → train LoRA → gate → canary ...", flush=True)
        _nightly(cfg, settings, model_path, controller)
        exp = controller.running_canary(cfg.alias)
        print(f"[5/6] canary on real traffic, one simulated day per round (max {cfg.rounds}) ...", flush=True)
        promoted, decisions = _canary_rounds(cfg, users, gateway, controller, exp)
        _, answers_after, after = users.holdout(f"held-out {noun}, alias now")
        comparison = Comparison()
        if promoted is not None:  # the judge compares the promoted adapter's answers with the base's
            comparison = scenario.compare(items, answers_before, answers_after, demo_env(settings))
        print(f"[6/6] {title}: before {before[scenario.metric]:.0%} → after {after[scenario.metric]:.0%}; "
              f"promoted: {promoted or 'nothing'}", flush=True)  # fmt: skip
        for line in comparison.lines:
            print(f"      {line.replace('**', '')}", flush=True)
        result = DemoResult(before[scenario.metric], after[scenario.metric], promoted, decisions,
                            elapsed_s=time.monotonic() - started, scenario=scenario.name, metrics_before=before,
                            metrics_after=after, comparison=comparison.figures,
                            gate=last_gate(settings, cfg.alias))  # fmt: skip
        result.report_path = write_report(workdir, cfg, result, registry, exp.id if exp else None, settings,
                                          scenario, comparison)  # fmt: skip
        print(f"      report: {result.report_path}  ({result.elapsed_s / 60:.1f} min)", flush=True)
        return result
    finally:
        gateway.stop()


def _before_after_plot(workdir: Path, cfg: DemoConfig, result: DemoResult, scenario: Scenario) -> None:
    """One bar pair (before, after) per held-out metric of the scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = scenario.metric_titles()
    keys = [k for k in titles if k in result.metrics_before and k in result.metrics_after]
    fig, ax = plt.subplots(figsize=(5 if len(keys) <= 1 else 2.2 * len(keys) + 1.5, 3.5))
    if len(keys) <= 1:
        ax.bar(["before (base)", "after"], [result.before_rate, result.after_rate], color=["#999", "#2a7"])
        ax.set_ylabel(f"{scenario.metric_title} (held-out)")
    else:
        xs = range(len(keys))
        for shift, label, values, color in ((-0.2, "before (base)", result.metrics_before, "#999"),
                                            (0.2, "after", result.metrics_after, "#2a7")):  # fmt: skip
            ax.bar([x + shift for x in xs], [values[k] for k in keys], 0.4, color=color, label=label)
        ax.set_xticks(list(xs), [titles[k] for k in keys], fontsize=8)
        ax.set_ylabel("held-out")
        ax.legend(fontsize=8)
    ax.set_ylim(0, 1)
    scenario_tag = "" if scenario.name == "reviews" else f"{scenario.name}, "
    ax.set_title(f"loraloop demo ({scenario_tag}{cfg.preset}{', A/A' if cfg.aa else ''})")
    fig.tight_layout()
    fig.savefig(workdir / "before_after.png", dpi=100)
    plt.close(fig)


def _summary_lines(cfg: DemoConfig, result: DemoResult, scenario: Scenario, comparison: Comparison) -> list[str]:
    titles = scenario.metric_titles()
    lines = [f"- {scenario.metric_title} on {cfg.holdout} held-out {scenario.holdout_noun}: before "
             f"**{result.before_rate:.0%}**, after **{result.after_rate:.0%}**"]  # fmt: skip
    lines += [f"- {titles[k]}: before {_pct(result.metrics_before, k)}, after {_pct(result.metrics_after, k)}"
              for k in titles if k != scenario.metric]  # fmt: skip
    return lines + [f"- {line}" for line in comparison.lines]


def write_report(
    workdir: Path, cfg: DemoConfig, result: DemoResult, registry: Registry, exp_id: str | None, settings: Settings,
    scenario: Scenario | None = None, comparison: Comparison | None = None,
) -> Path:  # fmt: skip
    from feedback.plot import write_plot
    from feedback.report import build_report

    scenario = scenario or get_scenario(cfg.scenario, cfg.preset)
    _before_after_plot(workdir, cfg, result, scenario)
    name = "" if scenario.name == "reviews" else f" {scenario.name} scenario,"
    lines = [f"# loraloop demo —{name} {cfg.preset}{' (A/A)' if cfg.aa else ''}", "",
             *_summary_lines(cfg, result, scenario, comparison or Comparison()),
             f"- promoted: **{result.promoted or 'nothing'}**",
             f"- time: {result.elapsed_s / 60:.1f} min", "", "![before/after](before_after.png)", ""]  # fmt: skip
    if scenario.show_gate:
        lines += ["## Gate (the nightly run, on the holdout split of the users' feedback)", ""]
        gate_txt = sorted((workdir / "runs").glob("*/gate.txt"))
        lines += ["```", gate_txt[-1].read_text().rstrip(), "```", ""] if gate_txt else ["no run reached the gate", ""]
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
    scenario = getattr(args, "scenario", "reviews")
    tag = "" if scenario == "reviews" else f"-{scenario}"
    default_dir = paths.STATE_ROOT / f"demo-{args.preset}{tag}{'-aa' if args.aa else ''}"
    workdir = Path(args.workdir) if args.workdir else default_dir
    cfg = DemoConfig.for_scenario(scenario, preset=args.preset, aa=args.aa, workdir=workdir)
    result = run_demo(cfg)
    ok = result.promoted is None if cfg.aa else (result.promoted is not None and result.after_rate > result.before_rate)
    print("demo " + ("succeeded" if ok else "did not reach the expected outcome"))
    return 0 if ok else 1


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the whole loop on this machine (real vLLM, real training)")
    p.add_argument("--preset", choices=["smollm2", "tiny"], default="smollm2", help="base model (tiny: fast run)")
    p.add_argument("--scenario", choices=list(SCENARIOS), default="reviews",
                   help="what the users want: reviews (a house label), tools (tool calls to a convention), "
                        "open (open-ended answers in a house style, rubric + pairwise judge)")  # fmt: skip
    p.add_argument("--aa", action="store_true", help="A/A mode: no real difference between arms")
    p.add_argument("--workdir", help="where everything is written (default ./.loraloop/demo-PRESET[-SCENARIO])")
    p.set_defaults(func=cmd_demo)


__all__ = ["CANARY_PREFIX", "SCENARIO_KNOBS", "DemoConfig", "DemoResult", "run_demo"]
