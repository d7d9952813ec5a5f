"""Configuration of the data preparation of the nightly retrain (``DataConfig`` and its parts).

See docs/data-preparation.md for what every stage does. The training recipe's settings live in
``retrain/recipe.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

PIIType = Literal["email", "phone", "card", "ip", "key"]
AugmentTechnique = Literal["templates", "case_punctuation", "paraphrase"]

DEFAULT_TEMPLATES = [
    "{text}\n\nPlease answer.",
    "Please help me with the following.\n\n{text}",
    "Question: {text}",
    "I have a request: {text}",
    "{text}\n\nThanks in advance!",
]


class CleaningConfig(BaseModel):
    """Which rows are dropped (or repaired) before anything else."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Run the cleaning stage at all.")
    repair_encoding: bool = Field(
        default=True,
        description="Repair mojibake (e.g. 'cafÃ©' -> 'café') with ftfy when it is installed. Text that stays "
        "broken afterwards (U+FFFD, lone surrogates, control characters other than tab/newline/CR, or mojibake "
        "when ftfy is missing) drops the row with reason `broken_encoding`.",
    )
    max_prompt_tokens: int = Field(
        default=2048,
        ge=1,
        description="Longest prompt in base-tokenizer tokens, counted on the chat-template-rendered prompt "
        "(generation prompt included); longer rows are dropped (`prompt_too_long`).",
    )
    max_answer_tokens: int = Field(
        default=2048,
        ge=1,
        description="Longest answer (completion, chosen or rejected) in base-tokenizer tokens, end-of-turn token "
        "not counted; longer rows are dropped (`answer_too_long`).",
    )
    drop_errors: bool = Field(
        default=True,
        description="Drop rows whose answer came from a failed request: `status` >= 400 or a non-empty `error` "
        "field, when the export provides those fields (`error_response`). Not applied to corrections: their "
        "answer was written by a person.",
    )
    drop_truncated: bool = Field(
        default=True,
        description="Drop rows whose model answer was cut off: `finish_reason == 'length'`, or a `truncated: true` "
        "flag in the row or its metadata (`truncated`). Not applied to corrections.",
    )
    drop_unfinished_sentences: bool = Field(
        default=False,
        description="Also drop answers that end mid-sentence (no closing punctuation, bracket, quote or code "
        "fence) — a heuristic, off by default (`unfinished_sentence`).",
    )


class DedupeConfig(BaseModel):
    """Exact and near-duplicate removal (SFT: prompt + answer; pairs: prompt + chosen + rejected)."""

    model_config = ConfigDict(extra="forbid")

    exact: bool = Field(
        default=True, description="Drop rows whose normalised text (NFKC, case-folded, whitespace collapsed) repeats."
    )
    near: bool = Field(default=True, description="Drop near-duplicates with MinHash LSH (needs `datasketch`).")
    threshold: float = Field(
        default=0.8, gt=0, le=1, description="Jaccard similarity of the shingle sets above which rows are duplicates."
    )
    shingle_size: int = Field(default=2, ge=1, description="Shingle length, in units of `shingle_unit`.")
    shingle_unit: Literal["word", "char"] = Field(
        default="word", description="Shingles of words (fast, the default) or of characters (better on short texts)."
    )
    num_perm: int = Field(default=128, ge=16, description="MinHash permutations (precision vs speed).")
    keep: Literal["strongest", "earliest"] = Field(
        default="strongest",
        description="Which row of a duplicate group survives. `strongest`: the best-ranked `origin` in "
        "`origin_priority`, then the earliest `available_at`, then the smallest row_id. `earliest`: the earliest "
        "`available_at`, then the smallest row_id.",
    )
    origin_priority: list[str] = Field(
        default=["correction", "rated_good", "rating", "seed"],
        description="Origins from the strongest signal to the weakest (for `keep: strongest`); others come last.",
    )


class PIIConfig(BaseModel):
    """Scrubbing of personal data and secrets from prompts and answers."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Run the PII stage.")
    types: list[PIIType] = Field(
        default=["email", "phone", "card", "ip", "key"],
        description="What is replaced: `email` -> <EMAIL>, `phone` -> <PHONE>, `card` (Luhn-valid numbers only) "
        "-> <CARD>, `ip` (v4 and v6) -> <IP>, `key` (API keys, AWS keys, bearer tokens, keyword-assigned and "
        "high-entropy secrets) -> <KEY>.",
    )
    min_secret_length: int = Field(
        default=32,
        ge=16,
        description="Shortest standalone base64-like string treated as a secret (it also needs upper case, lower "
        "case and digits, and high entropy).",
    )
    min_hex_secret_length: int = Field(
        default=48,
        ge=32,
        description="Shortest standalone hex string treated as a secret; the default spares git SHAs and MD5/SHA-1 "
        "digests (32/40 characters). Hex values assigned to a key/secret/token/password keyword are always scrubbed.",
    )


class BalanceConfig(BaseModel):
    """Balancing of the training split across one attribute."""

    model_config = ConfigDict(extra="forbid")

    attribute: str | None = Field(
        default=None,
        description="Attribute to balance (`label`, `task`, `slice`, `alias`, any metadata key); None turns the "
        "stage off. Rows without it count as `DataConfig.missing_value`.",
    )
    mode: Literal["resample", "weights"] = Field(
        default="weights",
        description="`resample`: duplicate (up) or drop (down) training rows; `weights`: keep the rows and set a "
        "`weight` column (mean 1.0 over the training split) that scales each row's tokens in the SFT loss "
        "(ignored, with a logged warning, by DPO, packing and token_metrics).",
    )
    target: Literal["uniform", "capped"] = Field(
        default="uniform",
        description="`uniform`: every value gets the same share; `capped`: shares may differ by at most "
        "`max_ratio` (largest / smallest).",
    )
    max_ratio: float = Field(default=3.0, ge=1, description="Largest / smallest class size for `target: capped`.")
    direction: Literal["up", "down"] = Field(
        default="up",
        description="`up`: raise small classes to the target (no row lost); `down`: lower large classes.",
    )
    max_factor: float = Field(
        default=10.0, ge=1, description="A class is never up-sampled (or up-weighted) by more than this factor."
    )


class ParaphraseConfig(BaseModel):
    """Paraphrasing of prompts by the served model through the gateway's OpenAI API (optional)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = Field(
        default=None, description="Gateway base URL, e.g. http://127.0.0.1:8000/v1; None disables paraphrasing."
    )
    api_key: SecretStr | None = Field(default=None, description="Gateway API key.")
    alias: str | None = Field(default=None, description="Model alias to ask; None disables paraphrasing.")
    timeout_s: float = Field(default=30.0, gt=0, description="Timeout of one paraphrase request.")
    max_rows: int = Field(default=200, ge=0, description="At most this many prompts are paraphrased per run.")
    temperature: float = Field(default=0.0, ge=0, description="Sampling temperature (0 keeps runs repeatable).")
    max_tokens: int = Field(default=512, ge=1, description="Longest paraphrase, in tokens.")


class AugmentConfig(BaseModel):
    """Optional augmentation of training rows (never validation or holdout); off by default."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="Augment the training split.")
    techniques: list[AugmentTechnique] = Field(
        default=["templates"],
        description="`templates`: wrap the last user message in an instruction template; `case_punctuation`: "
        "change the first letter's case / the final punctuation; `paraphrase`: ask the served model (see "
        "`paraphrase`). Each technique yields at most one variant per chosen row.",
    )
    ratio: float = Field(
        default=0.2, ge=0, le=5, description="Variants per technique, as a fraction of the original training rows."
    )
    kinds: list[Literal["sft", "pairs"]] = Field(default=["sft"], description="Which datasets are augmented.")
    templates: list[str] = Field(
        default=list(DEFAULT_TEMPLATES),
        description="Instruction templates with a `{text}` placeholder (English; rows whose `lang` slice is set "
        "and not `en` are not templated).",
    )
    paraphrase: ParaphraseConfig = Field(default_factory=ParaphraseConfig, description="Gateway paraphrasing.")

    @model_validator(mode="after")
    def _templates_have_placeholder(self) -> AugmentConfig:
        bad = [t for t in self.templates if "{text}" not in t]
        if bad:
            raise ValueError(f"augment templates need a {{text}} placeholder: {bad}")
        return self


class SplitConfig(BaseModel):
    """Train / validation / holdout assignment by a stable hash (see docs/data-preparation.md)."""

    model_config = ConfigDict(extra="forbid")

    salt: str = Field(
        default="loraloop-split-v1",
        description="Salt of the split hash. Changing it reshuffles every split (and the holdout's comparability).",
    )
    validation: float = Field(default=0.1, ge=0, lt=1, description="Share of prompts in the validation split.")
    holdout: float = Field(default=0.1, ge=0, lt=1, description="Share of prompts in the holdout split.")
    key: Literal["prompt", "request_id"] = Field(
        default="prompt",
        description="`prompt`: hash the normalised prompt (stateless; the same prompt lands in the same split "
        "every night). `request_id`: hash the request id of the earliest row with that prompt in this run.",
    )
    folds: int = Field(
        default=0,
        ge=0,
        description="k-fold cross-validation of the search's trials (needs `search.enabled`): give train and "
        "validation rows a `fold` in 0..folds-1 (0: off); each trial then scores its mean validation loss over "
        "the folds. The holdout is never folded.",
    )

    @model_validator(mode="after")
    def _ratios(self) -> SplitConfig:
        if self.validation + self.holdout >= 1:
            raise ValueError("splits.validation + splits.holdout must be below 1")
        if self.folds == 1:
            raise ValueError("splits.folds must be 0 (off) or at least 2")
        return self


class DataConfig(BaseModel):
    """Data preparation of the nightly retrain: cleaning, PII, dedupe, splits, balance, augmentation, format."""

    model_config = ConfigDict(extra="forbid")

    seed_dataset: Path | None = Field(
        default=None,
        description="Optional fixed JSONL dataset added to every run (`messages` or `prompt`, and `completion` or "
        "`chosen`/`rejected`; a missing `request_id` is derived from the content).",
    )
    chat_template: str | None = Field(
        default=None,
        description="Chat template the rows are rendered with: a Jinja file, or the name of one shipped in "
        "serving/templates (e.g. `smollm2-tools`); None = the base tokenizer's. Must be the template the model "
        "is served with; rows with tool calls need one that renders `tools` and `tool_calls`.",
    )
    min_rows: int = Field(
        default=50,
        ge=0,
        description="prepare() raises NotEnoughData when fewer original (not augmented or re-sampled) training "
        "rows remain, SFT and pairs together; 0 disables the check.",
    )
    cleaning: CleaningConfig = Field(default_factory=CleaningConfig, description="Cleaning stage.")
    dedupe: DedupeConfig = Field(default_factory=DedupeConfig, description="Duplicate removal.")
    pii: PIIConfig = Field(default_factory=PIIConfig, description="PII scrubbing.")
    balance: BalanceConfig = Field(default_factory=BalanceConfig, description="Balancing of the training split.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Augmentation (off by default).")
    splits: SplitConfig = Field(default_factory=SplitConfig, description="Train / validation / holdout split.")
    slice_attributes: list[str] = Field(
        default=["task", "label"],
        description="Attributes copied into every row's `slices` dict for per-slice evaluation (top-level export "
        "columns such as `alias` or `origin`, then metadata keys; `label` falls back to the row's `labels`).",
    )
    missing_value: str = Field(
        default="unknown", description="Value of a slice or balance attribute that a row does not have."
    )
