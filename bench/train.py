"""Training throughput: the recipe's trainer (TRL SFTTrainer + peft) against a plain transformers + peft loop
on the same data, in real (non-padding) training tokens per second; with and without packing on
variable-length data. Targets: ratio >= 1.0x, and >= 1.5x with packing.

The runs are interleaved and repeated (the machine may be shared); the figures are medians. The recipe runs
with its defaults (padding-free batches, the lean completion-only loss); ``--stock`` adds, for reference, the
recipe with TRL's own loss (``token_metrics: true``: TRL's LM head over every position for its per-step entropy /
token accuracy) and TRL's defaults (padded batches and TRL's loss).

    python -m bench.train [--model DIR] [--rows 256] [--batch 16] [--threads 1] [--repeats 3] [--stock]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def make_rows(tok: Any, n: int, seed: int = 0) -> list[dict[str, str]]:
    """Chat rows of very different lengths (2 to 60 words of prompt, 1 to 40 words of answer)."""
    rng = random.Random(seed)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "fox", "golf", "hotel", "india", "juliet", "kilo"]
    rows = []
    for _ in range(n):
        user = " ".join(rng.choice(words) for _ in range(rng.choice([2, 4, 8, 30, 60])))
        answer = " ".join(rng.choice(words) for _ in range(rng.choice([1, 3, 10, 40])))
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
        rows.append({"prompt": prompt, "completion": answer + "<|im_end|>"})
    return rows


def real_tokens(tok: Any, rows: list[dict[str, str]]) -> int:
    return sum(len(tok(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"]) for r in rows)


def plain_loop(model_dir: Path, rows: list[dict[str, str]], batch: int, lr: float) -> float:
    """A straightforward transformers + peft loop (pad to the batch's longest, AdamW); seconds of training."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    pad = tok.pad_token_id
    started = time.perf_counter()
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        seqs, labels = [], []
        for r in chunk:
            p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
            c = tok(r["completion"], add_special_tokens=False)["input_ids"]
            seqs.append(p + c)
            labels.append([-100] * len(p) + c)
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
        mask = (ids != pad).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - started


def recipe_run(model_dir: Path, rows: list[dict[str, str]], batch: int, lr: float, **train_kw: Any) -> float:
    """Seconds of ``trainer.train()`` (TRL's train_runtime) for one epoch of the recipe's trainer."""
    from retrain.recipe import LoraSection, ModelSection, TrainSection
    from retrain.train import train_adapter

    train = TrainSection(epochs=1, learning_rate=lr, batch_size=batch, max_length=512, torch_threads=None,
                         **train_kw)  # fmt: skip
    # the recipe's per-step logging stays on (it costs nothing measurable); only its printing is kept off the table
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        res = train_adapter(ModelSection(base=str(model_dir)), LoraSection(r=8, alpha=16), train, {"train": rows},
                            Path(tmp) / "a", Path(tmp) / "w", seed=0, report_to=())  # fmt: skip
    return float(res.extra["train_metrics"]["train_runtime"])


def main() -> None:
    import torch
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="base model directory (default: build the tiny preset)")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported")
    ap.add_argument("--stock", action="store_true", help="also run TRL's loss, and TRL's defaults (padded)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants: dict[str, dict[str, Any]] = {
        "recipe (TRL)": {},
        "recipe (TRL, packing)": {"packing": True},
    }
    if args.stock:
        variants["recipe, TRL's loss"] = {"token_metrics": True}
        variants["TRL defaults (padded)"] = {"padding_free": False, "token_metrics": True}
    times: dict[str, list[float]] = {"plain transformers+peft": []} | {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else None
        if model_dir is None:
            from retrain.models.prepare import build_tiny

            model_dir = build_tiny(Path(tmp) / "tiny")
        tok = AutoTokenizer.from_pretrained(model_dir)
        rows = make_rows(tok, args.rows)
        tokens = real_tokens(tok, rows)
        lr = 1e-3
        plain_loop(model_dir, rows[: args.batch * 2], args.batch, lr)  # warm-up
        for _ in range(args.repeats):
            times["plain transformers+peft"].append(plain_loop(model_dir, rows, args.batch, lr))
            for name, kw in variants.items():
                times[name].append(recipe_run(model_dir, rows, args.batch, lr, **kw))
    print(f"{len(rows)} rows, {tokens} real tokens, batch {args.batch}, {args.threads} thread(s), "
          f"median of {args.repeats} interleaved repeats")  # fmt: skip
    t_plain = statistics.median(times["plain transformers+peft"])
    for name, ts in times.items():
        t = statistics.median(ts)
        per_repeat = " ".join(f"{p / x:.2f}" for p, x in zip(times["plain transformers+peft"], ts, strict=True))
        print(f"{name:26s} {t:7.2f}s  {tokens / t:9.0f} tok/s  ratio {t_plain / t:5.2f}x  (per repeat: {per_repeat})")


if __name__ == "__main__":
    main()
