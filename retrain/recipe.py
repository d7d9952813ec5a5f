"""A training recipe: one YAML file, validated into these pydantic models (every field is documented).

The recipe runs as steps (``retrain.run.run_recipe``): setup -> export -> prepare -> train -> evaluate -> publish;
each step gets only its own sections (``model``, ``data``, ``lora``, ``train``, ``search``, ``eval``, ``output``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core import paths
from core.errors import UsageError
from retrain.config import DataConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Strict):
    """The base model the adapter is trained on."""

    base: str = Field(description="Base model directory (the path production serves; stored in adapter_config.json).")
    revision: str | None = Field(
        None, description="Revision of the base; default: a hash of its config.json and weight file names/sizes."
    )
    quantization: Literal["none", "nf4"] = Field(
        "none", description="`nf4`: QLoRA — load the base in 4-bit NF4 through bitsandbytes (needs bitsandbytes)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights / compute dtype. float32 on CPU; bfloat16 on modern GPUs."
    )


class LoraSection(_Strict):
    """The LoRA adapter (ignored for the shape when warm-starting: the champion's config is kept)."""

    r: int = Field(8, ge=1, le=256, description="LoRA rank (must not exceed the server's max LoRA rank).")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names to adapt.",
    )
    layers_to_transform: list[int] | None = Field(
        None, description="Only adapt these decoder layers (the rest stay frozen); None = all layers."
    )
    init: Literal["scratch", "champion"] = Field(
        "scratch",
        description="`champion`: warm start from the alias's champion adapter (its weights loaded trainable; "
        "from scratch when there is no champion); `scratch`: a fresh adapter.",
    )


class TrainSection(_Strict):
    """The trainer (TRL SFTTrainer / DPOTrainer on top of transformers' Trainer)."""

    method: Literal["sft", "dpo"] = Field("sft", description="`sft`: supervised rows; `dpo`: preference pairs.")
    epochs: float = Field(3.0, gt=0, description="Training epochs (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    layer_lr_decay: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Per-layer learning rates: layer i of n gets lr * decay**(n-1-i) (top layer: full lr). "
        "1.0 = one learning rate.",
    )
    batch_size: int = Field(8, ge=1, description="Per-device batch size.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(512, ge=16, description="Longest tokenized example (prompt + completion).")
    packing: bool = Field(
        False,
        description="SFT: pack several examples into rows of max_length (TRL's bfd packing, padding-free: each "
        "example attends only to itself). Fewer, fuller optimizer steps than without packing.",
    )
    padding_free: bool = Field(
        True,
        description="SFT: lay each batch's examples end to end in one row instead of padding them to the longest "
        "(position_ids restart per example; attention stays within each example). Same batches and loss as "
        "padded training, without the compute spent on padding. sdpa models use a per-example attention "
        "(`retrain.attention.VARLEN_ATTENTION`); flash-attention models their varlen kernels.",
    )
    group_by_length: bool = Field(
        False,
        description="SFT: batch examples of similar length together (transformers' LengthGroupedSampler: "
        "random mega-batches of up to 50 batches, sorted by length). Less padding when padding_free is off; "
        "batches are less random.",
    )
    token_metrics: bool = Field(
        False,
        description="SFT: log TRL's per-step `entropy` and `mean_token_accuracy` (computed over the whole "
        "vocabulary for every token, forward and backward: costly without a GPU). Off: plain cross-entropy with "
        "the LM head run only where a completion token is predicted; same loss.",
    )
    completion_only_loss: bool = Field(True, description="SFT: learn the completion only (prompt masked).")
    dpo_beta: float = Field(0.1, gt=0, description="DPO: beta (strength of the KL to the reference).")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without a better validation loss; None = off."
    )
    eval_every_steps: int | None = Field(
        None, ge=1, description="Evaluate (and checkpoint) every N steps; None = once per epoch."
    )
    save_steps: int | None = Field(None, ge=1, description="Checkpoint every N steps; None = with the evaluations.")
    logging_steps: int = Field(1, ge=1, description="Log the training loss every N steps.")
    bf16: bool = Field(False, description="bf16 mixed precision (GPUs; 5x slower on CPU).")
    fp16: bool = Field(False, description="fp16 mixed precision (older GPUs).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (large models only).")
    torch_threads: int | None = Field(
        1, ge=1, description="torch threads while training on CPU (1 is fastest for tiny models); None = leave."
    )


class SearchSection(_Strict):
    """Hyper-parameter search with Optuna (TPE sampler, median pruner on validation loss). With k-fold
    cross-validation (`data.prepare.splits.folds` = k >= 2) each trial trains k times and scores the mean
    validation loss over the folds (the run shows mean ± sd); the candidate is then trained with the best
    trial's parameters on the train split (retrain/search.py)."""

    enabled: bool = Field(
        False,
        description="Run the search; the best trial (lowest validation loss, or mean over the folds) gives the "
        "candidate: its adapter, or with folds a training with its parameters on the train split.",
    )
    n_trials: int = Field(4, ge=1, description="Budget: number of trials.")
    timeout_s: float | None = Field(None, gt=0, description="Budget: wall-clock seconds for the whole search.")
    learning_rate: tuple[float, float] = Field((1e-4, 3e-3), description="Log-uniform range of the learning rate.")
    r: list[int] = Field(default_factory=lambda: [4, 8, 16], description="LoRA ranks to try.")
    alpha_over_r: list[float] = Field(default_factory=lambda: [1.0, 2.0], description="alpha = r * one of these.")
    dropout: tuple[float, float] = Field((0.0, 0.1), description="Uniform range of lora dropout.")
    epochs: list[float] = Field(default_factory=lambda: [1.0, 2.0, 3.0], description="Epoch counts to try.")
    pruner_warmup_steps: int = Field(
        0,
        ge=0,
        description="MedianPruner: no pruning before this many steps (with folds: completed folds - 1; the "
        "pruner then compares the running mean over the folds done).",
    )


EvaluatorName = Literal[
    "exact_match", "preferred_match", "loss", "preferred_loss", "chrf", "rouge_l", "judge", "tool_calls", "json_schema"
]  # fmt: skip
#: Evaluator name -> the metrics it produces (retrain.evaluators; docs/retrain.md, "Choosing evaluators").
METRICS: dict[str, tuple[str, ...]] = {
    "exact_match": ("exact_match", "accuracy", "macro_f1", "macro_precision", "macro_recall"),
    "preferred_match": ("preferred_match_rate",),
    "loss": ("neg_loss", "loss", "perplexity"),
    "preferred_loss": ("preferred_neg_loss", "preferred_loss"),
    "chrf": ("chrf",),
    "rouge_l": ("rouge_l",),
    "judge": ("judge_win_rate", "judge_win_rate_low", "judge_win_rate_high"),
    "tool_calls": ("tool_valid_rate", "tool_name_accuracy", "tool_exact_match", "tool_field_f1"),
    "json_schema": ("schema_valid_rate",),
}
#: What the gate computed before evaluators could be chosen: old recipes keep exactly these figures.
DEFAULT_EVALUATORS = ("exact_match", "preferred_match", "loss")
#: Metrics where lower is better, or interval bounds: reported, never the primary metric.
NOT_GATEABLE = frozenset(
    {"loss", "perplexity", "preferred_loss", "macro_precision", "macro_recall", "judge_win_rate_low",
     "judge_win_rate_high"}
)  # fmt: skip
RUBRIC_PREFIX = "rubric:"


def evaluator_of(metric: str) -> str | None:
    """The evaluator that produces ``metric`` (``rubric`` for ``rubric:<name>``); None for an unknown metric."""
    if metric.startswith(RUBRIC_PREFIX) and len(metric) > len(RUBRIC_PREFIX):
        return "rubric"
    return next((name for name, metrics in METRICS.items() if metric in metrics), None)


def gateable_metrics() -> list[str]:
    """Every metric a recipe may name as its primary metric (plus ``rubric:<name>``)."""
    return [m for metrics in METRICS.values() for m in metrics if m not in NOT_GATEABLE]


def rubric_default_name(spec: str) -> str:
    """The name of a rubric the recipe names none for: the callable's or the entry point's."""
    if ":" in spec:
        return spec.rsplit(":", 1)[1].rsplit(".", 1)[-1]
    return spec.rsplit(".", 1)[-1]


class RubricSpec(_Strict):
    """A rubric plug-in in `eval.evaluators`: `{rubric: "pkg.mod:func", name: polite}`."""

    rubric: str = Field(
        min_length=1, description="`package.module:callable` (or `package.module.callable`), or the name of an "
        "entry point in the group `loraloop.rubrics`; called as (holdout row, answer text) -> score in [0, 1]."
    )  # fmt: skip
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="Metric name `rubric:<name>`; default the callable's name."
    )

    @property
    def metric(self) -> str:
        return f"{RUBRIC_PREFIX}{self.name or rubric_default_name(self.rubric)}"


class JudgeSection(_Strict):
    """The pairwise judge (`judge` in `eval.evaluators`): any OpenAI-compatible chat endpoint."""

    url: str | None = Field(
        None, description="Base URL of the endpoint, ending in `/v1` as in OpenAI's clients (requests go to "
        "`{url}/chat/completions`); required when the judge is listed."
    )  # fmt: skip
    model: str | None = Field(None, description="The judge model's name at that endpoint; required with the judge.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the endpoint's API key (sent as a Bearer "
        "token); None = no key. Named but unset: the gate fails closed."
    )  # fmt: skip
    prompt_version: Literal["pairwise-v1"] = Field(
        "pairwise-v1", description="Judge prompt version (`retrain.evaluators.judge.JUDGE_PROMPTS`; stored in the "
        "gate result with the prompt's SHA-256)."
    )  # fmt: skip
    threshold: float = Field(
        0.5, ge=0.0, lt=1.0, description="With `primary_metric: judge_win_rate`: the Wilson interval's lower bound "
        "of the candidate's win rate against the reference must exceed this (0.5: better with confidence)."
    )  # fmt: skip
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="Confidence level of the Wilson interval.")
    max_tokens: int = Field(4, ge=1, description="Longest judge reply (a verdict is `A`, `B` or `TIE`).")
    concurrency: int = Field(8, ge=1, description="Concurrent judge requests.")
    timeout_s: float = Field(60.0, gt=0, description="Timeout of one judge request.")
    max_invalid_fraction: float = Field(
        0.1, ge=0.0, le=1.0, description="Largest share of verdicts that may be unusable (endpoint errors, replies "
        "other than exactly `A`, `B`, `TIE`); more, and the gate fails closed."
    )  # fmt: skip
    min_human_agreement: float | None = Field(
        None, ge=0.0, le=1.0, description="Fail the gate when the judge prefers the human's choice on fewer of the "
        "holdout's preference pairs than this; None = report the agreement only."
    )  # fmt: skip


class EvalSection(_Strict):
    """The evaluation gate on the holdout split."""

    vllm_url: str | None = Field(
        None, description="An existing vLLM OpenAI server to generate with (runtime LoRA updating enabled); "
        "None = start one for the run."
    )  # fmt: skip
    base_model: str | None = Field(
        None, description="Base the generations run on (the production base, maybe quantized); default model.base."
    )
    served_model_name: str = Field("base", description="Name the vLLM server serves the base model under.")
    max_tokens: int = Field(16, ge=1, description="Longest generated answer.")
    concurrency: int = Field(16, ge=1, description="Concurrent generation requests.")
    start_timeout_s: float = Field(600.0, gt=0, description="How long a started vLLM may take to become healthy.")
    max_lora_rank: int = Field(16, ge=1, description="--max-lora-rank of a vLLM started for the run.")
    max_model_len: int | None = Field(1024, description="--max-model-len of a vLLM started for the run.")
    evaluators: list[EvaluatorName | RubricSpec] = Field(
        default_factory=lambda: cast("list[EvaluatorName | RubricSpec]", list(DEFAULT_EVALUATORS)),
        description="What the gate computes (docs/retrain.md, 'Choosing evaluators'): `exact_match` (and label "
        "metrics), `preferred_match`, `loss`, `preferred_loss`, `chrf`, `rouge_l`, `judge` (see `eval.judge`), "
        "`tool_calls`, `json_schema`, and rubric plug-ins `{rubric: 'pkg.mod:func', name: N}`. Default: what "
        "the gate always computed.",
    )
    judge: JudgeSection = Field(default_factory=lambda: JudgeSection(), description="The pairwise judge.")
    primary_metric: str = Field(
        "exact_match", description="The metric the candidate must improve: one of "
        + ", ".join(f"`{m}`" for m in gateable_metrics()) + ", or `rubric:<name>`; its evaluator must be "
        "listed. `judge_win_rate` gates on the Wilson lower bound against `judge.threshold`."
    )  # fmt: skip
    min_improvement: float = Field(0.0, description="The candidate's primary metric must beat the reference by more.")
    slice_tolerance: float = Field(0.05, ge=0.0, description="Largest allowed drop of a slice's primary metric.")
    min_slice_samples: int = Field(5, ge=1, description="Slices with fewer holdout rows are reported, not gated.")
    slice_attributes: list[str] | None = Field(
        None, description="Slice attributes to break down by (and their pairwise intersections); None = all."
    )
    max_labels: int = Field(20, ge=2, description="Answers are label-like when at most this many distinct short ones.")
    skip_generation: bool = Field(False, description="Gate on holdout loss only (no vLLM). For debugging.")

    @property
    def evaluator_names(self) -> list[str]:
        """The listed evaluators' names (`rubric:<name>` for a rubric)."""
        return [e if isinstance(e, str) else e.metric for e in self.evaluators]

    @model_validator(mode="after")
    def _consistent(self) -> EvalSection:
        names = self.evaluator_names
        if len(set(names)) != len(names):
            raise ValueError(f"evaluators listed twice: {sorted({n for n in names if names.count(n) > 1})}")
        metric, source = self.primary_metric, evaluator_of(self.primary_metric)
        if source is None or (metric not in gateable_metrics() and source != "rubric"):
            raise ValueError(f"primary_metric {metric!r} is not a metric the gate can gate on")
        if (metric if source == "rubric" else source) not in names:
            raise ValueError(f"primary_metric {metric!r} needs the evaluator {source!r} in evaluators")
        if "judge" in names and not (self.judge.url and self.judge.model):
            raise ValueError("the judge evaluator needs eval.judge.url and eval.judge.model")
        return self


class DataSection(_Strict):
    """Where the training data comes from and how it is split."""

    store_root: Path | None = Field(
        None, description="Event store root; default: the CLI's --store, else the settings' `store.root`."
    )
    good_score: float = Field(4.0, description="Scores >= this count as good answers.")
    bad_score: float = Field(2.0, description="Scores <= this count as bad answers.")
    lag_s: float | None = Field(
        None,
        ge=0,
        description="The export stops this many seconds before now (events still in flight are left for the next "
        "run); None = the settings' `store.export_lag_s`, which the cycle and `loraloop retrain` pass.",
    )
    prepare: DataConfig = Field(
        default_factory=lambda: DataConfig(),
        description="Data preparation: cleaning, PII, dedupe, splits, balance, augmentation "
        "(retrain.config.DataConfig; docs/data-preparation.md).",
    )


class OutputSection(_Strict):
    """Where runs, adapters and the registry live."""

    runs_dir: Path = Field(paths.RUNS_DIR, description="One directory per run (checkpoints, logs, plot).")
    registry_path: Path | None = Field(None, description="Registry DuckDB file; default: the settings' registry_path.")
    adapter_root: Path | None = Field(None, description="Adapter root; default: the settings' adapter_root.")
    max_lora_rank: int | None = Field(None, description="Checked on the adapter; default: the settings' max_lora_rank.")


class Recipe(_Strict):
    """A complete retraining recipe."""

    name: str = Field("recipe", description="A name for humans.")
    seed: int = Field(0, description="Seed of everything (data split, init, order, search sampler).")
    model: ModelSection = Field(description="The base model.")
    lora: LoraSection = Field(default_factory=lambda: LoraSection(), description="The adapter.")
    train: TrainSection = Field(default_factory=lambda: TrainSection(), description="The trainer.")
    search: SearchSection = Field(default_factory=lambda: SearchSection(), description="Hyper-parameter search.")
    eval: EvalSection = Field(default_factory=lambda: EvalSection(), description="The evaluation gate.")
    data: DataSection = Field(default_factory=lambda: DataSection(), description="Training data.")
    output: OutputSection = Field(default_factory=lambda: OutputSection(), description="Outputs.")

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.train.method == "dpo" and self.train.packing:
            raise ValueError("packing is an SFT option")
        if self.data.prepare.splits.folds > 1 and not self.search.enabled:
            raise ValueError("data.prepare.splits.folds: the folds cross-validate the search's trials; "
                             "set search.enabled: true, or folds: 0")  # fmt: skip
        return self

    def hash(self) -> str:
        """sha256 of the resolved recipe (canonical JSON), so defaults and overrides count."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


class RecipeError(UsageError, ValueError):
    """An unreadable or invalid recipe (one line for the operator)."""


def load_recipe(path: Path | str, **overrides: Any) -> Recipe:
    """Read and validate a recipe file; ``overrides`` (dotted keys, e.g. ``{"train.max_steps": 2}``) win.
    Relative paths in the recipe stay relative to the working directory."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"cannot read recipe {p}: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {p} must be a mapping")
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise RecipeError(f"recipe {p}: {where}: {first['msg']} ({exc.error_count()} error(s))") from exc


def base_revision(base: str | Path) -> str:
    """A stable fingerprint of a local base model: config.json bytes + weight file names and sizes."""
    d = Path(base)
    h = hashlib.sha256()
    cfg = d / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin")) + sorted(d.glob("*.gguf")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


__all__ = [
    "DataSection", "EvalSection", "JudgeSection", "LoraSection", "ModelSection", "OutputSection", "Recipe",
    "RecipeError", "RubricSpec", "SearchSection", "TrainSection", "base_revision", "evaluator_of", "gateable_metrics",
    "load_recipe", "rubric_default_name",
]  # fmt: skip
