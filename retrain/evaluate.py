"""The evaluation gate: candidate vs champion (and vs the base) on the holdout.

* Loss / perplexity: a transformers forward pass over the holdout (completion tokens only).
* Task metrics from generations through vLLM with the adapter loaded at runtime (``/v1/load_lora_adapter``
  under a unique name, temperature 0, concurrent requests, unloaded afterwards): exact match; accuracy and
  macro precision / recall / F1 when the answers are label-like; the rate at which the answer matches the
  preferred one of the holdout's preference pairs.
* Per-slice metrics for every slice attribute and every intersection of two attributes.
* The verdict: fails when a slice with at least ``min_slice_samples`` rows drops by more than
  ``slice_tolerance`` against the reference (the champion; the base when there is none), or when the
  overall primary metric does not beat the reference by more than ``min_improvement``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from retrain.recipe import EvalSection

log = logging.getLogger(__name__)


def normalize(text: str | None, stop: Sequence[str] = ("<|im_end|>", "</s>")) -> str:
    """Answer text for comparisons: cut at an end-of-turn marker, strip whitespace."""
    t = text or ""
    for s in stop:
        t = t.split(s, 1)[0]
    return t.strip()


def is_label_like(answers: Sequence[str], max_labels: int = 20, max_words: int = 3) -> bool:
    """Few distinct, short answers: a classification task."""
    distinct = set(answers)
    return 1 <= len(distinct) <= max_labels and all(len(a.split()) <= max_words for a in distinct)


def label_metrics(refs: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 over the reference labels (numpy; sklearn's definitions with
    zero_division=0, labels = the reference classes)."""
    r, p = np.asarray(refs, dtype=object), np.asarray(preds, dtype=object)
    labels = sorted(set(refs))
    precision, recall, f1 = [], [], []
    for lab in labels:
        tp = float(np.sum((p == lab) & (r == lab)))
        fp = float(np.sum((p == lab) & (r != lab)))
        fn = float(np.sum((p != lab) & (r == lab)))
        pr = tp / (tp + fp) if tp + fp else 0.0
        rc = tp / (tp + fn) if tp + fn else 0.0
        precision.append(pr)
        recall.append(rc)
        f1.append(2 * pr * rc / (pr + rc) if pr + rc else 0.0)
    return {
        "accuracy": float(np.mean(r == p)) if len(r) else 0.0,
        "macro_precision": float(np.mean(precision)) if labels else 0.0,
        "macro_recall": float(np.mean(recall)) if labels else 0.0,
        "macro_f1": float(np.mean(f1)) if labels else 0.0,
    }


def task_metrics(refs: Sequence[str], preds: Sequence[str], *, label_like: bool) -> dict[str, float]:
    refs_n, preds_n = [normalize(x) for x in refs], [normalize(x) for x in preds]
    out = {"exact_match": float(np.mean([a == b for a, b in zip(refs_n, preds_n, strict=True)])) if refs_n else 0.0}
    if label_like:
        out.update(label_metrics(refs_n, preds_n))
    out["n"] = float(len(refs_n))
    return out


def slice_keys(rows: Sequence[dict[str, Any]], attributes: Sequence[str] | None = None) -> dict[str, list[int]]:
    """Row indices of every slice ``attr=value`` and of every two-attribute intersection ``a=x&b=y``."""
    attrs = sorted({k for r in rows for k in (r.get("slices") or {})})
    if attributes is not None:
        attrs = [a for a in attrs if a in attributes]
    out: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        s = r.get("slices") or {}
        present = [(a, str(s[a])) for a in attrs if a in s and s[a] is not None]
        for a, v in present:
            out.setdefault(f"{a}={v}", []).append(i)
        for (a, v), (b, w) in itertools.combinations(present, 2):
            out.setdefault(f"{a}={v}&{b}={w}", []).append(i)
    return out


@dataclass
class ModelScores:
    """Holdout figures of one model (base, champion or candidate)."""

    name: str
    overall: dict[str, float]
    slices: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class GateResult:
    """The gate's verdict and every figure behind it."""

    passed: bool
    reasons: list[str]
    primary_metric: str
    reference: str
    scores: dict[str, ModelScores]
    slice_checks: list[dict[str, Any]]
    label_like: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """The verdict as a plain-text table (overall metrics, then gated slices)."""
        names = list(self.scores)
        metrics = sorted({k for s in self.scores.values() for k in s.overall})
        w = max([len("metric"), *map(len, metrics)]) + 2
        lines = [f"gate: {'PASSED' if self.passed else 'FAILED'} (primary {self.primary_metric}, vs {self.reference})"]
        lines.append("metric".ljust(w) + "".join(n.rjust(12) for n in names))
        for m in metrics:
            vals = [self.scores[n].overall.get(m) for n in names]
            lines.append(m.ljust(w) + "".join(("-" if v is None else f"{v:.4f}").rjust(12) for v in vals))
        if self.slice_checks:
            sw = max(len(c["slice"]) for c in self.slice_checks) + 2
            lines.append("")
            lines.append("slice".ljust(sw) + "n".rjust(5) + "reference".rjust(12) + "candidate".rjust(12) + "  ok")
            for c in self.slice_checks:
                ok = "yes" if c["ok"] else ("NO" if c["gated"] else "(n<min)")
                lines.append(c["slice"].ljust(sw) + str(c["n"]).rjust(5) + f"{c['reference']:.4f}".rjust(12)
                             + f"{c['candidate']:.4f}".rjust(12) + f"  {ok}")  # fmt: skip
        lines.extend(f"- {r}" for r in self.reasons)
        return "\n".join(lines)


def score(
    name: str,
    rows: Sequence[dict[str, Any]],
    preds: Sequence[str],
    *,
    label_like: bool,
    attributes: Sequence[str] | None = None,
    extra: dict[str, float] | None = None,
) -> ModelScores:
    """Overall and per-slice task metrics of ``preds`` against the rows' ``answer``."""
    refs = [str(r.get("answer", r.get("completion", ""))) for r in rows]
    overall = task_metrics(refs, preds, label_like=label_like)
    overall.update(extra or {})
    slices = {}
    for key, idx in slice_keys(rows, attributes).items():
        slices[key] = task_metrics([refs[i] for i in idx], [preds[i] for i in idx], label_like=label_like)
    return ModelScores(name, overall, slices)


def decide(
    candidate: ModelScores, reference: ModelScores, cfg: EvalSection, *, others: Sequence[ModelScores] = ()
) -> GateResult:
    """The verdict of ``candidate`` against ``reference`` (see the module docs)."""
    metric = cfg.primary_metric
    reasons: list[str] = []
    cand = candidate.overall.get(metric)
    ref = reference.overall.get(metric)
    passed = True
    if cand is None or ref is None:
        passed = False
        reasons.append(f"primary metric {metric} is not available")
    elif not cand - ref > cfg.min_improvement:
        passed = False
        reasons.append(
            f"{metric} {cand:.4f} does not beat {reference.name}'s {ref:.4f} by more than {cfg.min_improvement}"
        )
    else:
        reasons.append(f"{metric} {cand:.4f} vs {reference.name}'s {ref:.4f} (+{cand - ref:.4f})")
    checks = []
    slice_metric = metric if metric in ("exact_match", "accuracy", "macro_f1") else "exact_match"
    for key in sorted(set(candidate.slices) & set(reference.slices)):
        c, r = candidate.slices[key], reference.slices[key]
        n = int(c.get("n", 0))
        cv, rv = float(c.get(slice_metric, 0.0)), float(r.get(slice_metric, 0.0))
        gated = n >= cfg.min_slice_samples
        ok = not gated or cv >= rv - cfg.slice_tolerance
        checks.append({"slice": key, "n": n, "metric": slice_metric, "reference": rv, "candidate": cv,
                       "delta": cv - rv, "gated": gated, "ok": ok})  # fmt: skip
        if not ok:
            passed = False
            reasons.append(f"slice {key} (n={n}) regressed: {slice_metric} {cv:.4f} < {rv:.4f} - {cfg.slice_tolerance}")
    scores = {s.name: s for s in [*others, reference, candidate]}
    label_like = "accuracy" in candidate.overall
    return GateResult(passed, reasons, metric, reference.name, scores, checks, label_like)


# ------------------------------------------------------------------------------------ loss / ppl


def holdout_loss(
    base: str, adapter: Path | None, rows: Sequence[dict[str, Any]], *, threads: int | None = 1
) -> dict[str, float]:
    """Mean completion-token loss and perplexity of the base (+ adapter) on the holdout rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retrain.train import torch_threads

    if not rows:
        return {}
    tok = AutoTokenizer.from_pretrained(base)
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    total, count = 0.0, 0
    with torch_threads(threads), torch.no_grad():
        for r in rows:
            p = tok(str(r["prompt"]), add_special_tokens=False)["input_ids"]
            c = tok(str(r["completion"]), add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p + c])
            labels = torch.tensor([[-100] * len(p) + c])
            out = model(input_ids=ids, labels=labels)
            total += float(out.loss) * len(c)
            count += len(c)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "neg_loss": -loss}


# ----------------------------------------------------------------------------------------- vLLM


@contextlib.contextmanager
def vllm_server(cfg: EvalSection, base: str, *, log_path: Path) -> Iterator[str]:
    """``cfg.vllm_url`` when given; otherwise start a vLLM OpenAI server on ``base`` for the block (the
    same command line and environment as the gateway's managed back-end) and stop it afterwards."""
    if cfg.vllm_url:
        yield cfg.vllm_url.rstrip("/")
        return
    import socket

    from core.serving_config import ManagedBackendConfig
    from serving.managed import detect_device, vllm_command, vllm_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mcfg = ManagedBackendConfig(port=port, max_model_len=cfg.max_model_len, max_loras=2)
    device = detect_device("auto")
    cmd = vllm_command(base, cfg.served_model_name, mcfg, device, max_lora_rank=cfg.max_lora_rank)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as fh:
        proc = subprocess.Popen(cmd, env=vllm_env(mcfg, device), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + cfg.start_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode} while starting; see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not become healthy in {cfg.start_timeout_s}s; see {log_path}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def loaded_adapters(url: str, adapters: dict[str, Path]) -> Iterator[None]:
    """Load adapters into a vLLM server under the given names; unload them afterwards."""
    loaded = []
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            for name, path in adapters.items():
                r = c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(Path(path).resolve())})
                if r.status_code >= 400:
                    raise RuntimeError(f"vLLM refused adapter {name}: {r.status_code} {r.text[:200]}")
                loaded.append(name)
        yield
    finally:
        with httpx.Client(base_url=url, timeout=60) as c:
            for name in loaded:
                with contextlib.suppress(httpx.HTTPError):
                    c.post("/v1/unload_lora_adapter", json={"lora_name": name})


async def _generate_async(url: str, model: str, prompts: Sequence[str], max_tokens: int, concurrency: int) -> list[str]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one(prompt: str) -> str:
            async with sem:
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "seed": 0}
                r = await client.post("/v1/completions", json=body)
                r.raise_for_status()
                return str(r.json()["choices"][0]["text"])

        return list(await asyncio.gather(*(one(p) for p in prompts)))


def generate(url: str, model: str, prompts: Sequence[str], *, max_tokens: int, concurrency: int) -> list[str]:
    """Greedy completions of already chat-rendered ``prompts`` from a vLLM server (concurrent requests)."""
    return asyncio.run(_generate_async(url, model, list(prompts), max_tokens, concurrency))


def evaluate(
    cfg: EvalSection,
    *,
    base: str,
    holdout: Sequence[dict[str, Any]],
    pairs: Sequence[dict[str, Any]],
    candidate: Path,
    champion: Path | None,
    run_id: str,
    work_dir: Path,
) -> GateResult:
    """Score base, champion and candidate on the holdout and decide (see the module docs)."""
    holdout = list(holdout)
    pairs = list(pairs)
    models: dict[str, Path | None] = {"base": None}
    if champion is not None:
        models["champion"] = champion
    models["candidate"] = candidate
    losses = {name: holdout_loss(base, path, holdout) for name, path in models.items()}
    answers = [normalize(str(r.get("answer", r.get("completion", "")))) for r in holdout]
    label_like = is_label_like(answers, cfg.max_labels)
    preds: dict[str, list[str]] = {n: [""] * len(holdout) for n in models}
    pair_preds: dict[str, list[str]] = {n: [""] * len(pairs) for n in models}
    if not cfg.skip_generation and (holdout or pairs):
        gen_base = cfg.base_model or base
        names = {n: (cfg.served_model_name if p is None else f"eval-{run_id}-{n}") for n, p in models.items()}
        with (
            vllm_server(cfg, gen_base, log_path=work_dir / "vllm.log") as url,
            loaded_adapters(url, {names[n]: p for n, p in models.items() if p is not None}),
        ):
            for n in models:
                out = generate(url, names[n], [str(r["prompt"]) for r in holdout] + [str(r["prompt"]) for r in pairs],
                               max_tokens=cfg.max_tokens, concurrency=cfg.concurrency)  # fmt: skip
                preds[n], pair_preds[n] = out[: len(holdout)], out[len(holdout) :]
    scores: dict[str, ModelScores] = {}
    for n in models:
        extra = dict(losses[n])
        if pairs:
            chosen = [normalize(str(r["chosen"])) for r in pairs]
            extra["preferred_match_rate"] = float(
                np.mean([normalize(a) == c for a, c in zip(pair_preds[n], chosen, strict=True)])
            )
        scores[n] = score(n, holdout, preds[n], label_like=label_like, attributes=cfg.slice_attributes, extra=extra)
    reference = scores["champion"] if "champion" in scores else scores["base"]
    others = [s for n, s in scores.items() if n not in ("candidate", reference.name)]
    result = decide(scores["candidate"], reference, cfg, others=others)
    result.label_like = label_like
    return result


__all__ = [
    "GateResult", "ModelScores", "decide", "evaluate", "generate", "holdout_loss", "is_label_like",
    "label_metrics", "loaded_adapters", "normalize", "score", "slice_keys", "task_metrics", "vllm_server",
]  # fmt: skip
