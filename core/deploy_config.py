"""Settings slices of the promotion controller and the nightly cycle (`promotion:` and `cycle:` of the one
Settings object, core/settings.py; `LORALOOP_PROMOTION__*` / `LORALOOP_CYCLE__*`; read by deploy/)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from core import paths
from core.serving_config import http_urls


class CanaryGuardrails(BaseModel):
    """Limits the candidate arm must respect; a breach rolls the canary back at once."""

    model_config = ConfigDict(extra="forbid")
    error_rate_max: float | None = Field(
        0.05, ge=0, le=1, description="Share of candidate requests with status >= 500."
    )
    p95_latency_ms_max: float | None = Field(None, gt=0, description="95th percentile latency of the candidate, ms.")
    negative_feedback_rate_max: float | None = Field(
        None, ge=0, le=1, description="Share of the candidate's thumbs-rated requests rated down."
    )
    min_requests: int = Field(20, ge=1, description="Candidate requests needed before guardrails are judged.")


class PromotionConfig(BaseModel):
    """How a gated candidate becomes a canary arm and then the champion (or is rolled back)."""

    model_config = ConfigDict(extra="forbid")
    gateway_urls: list[str] = Field(
        default_factory=list,
        description="Admin URLs of every gateway replica (empty: this machine's gateway at host:port).",
    )
    ramp: list[float] = Field(
        default_factory=lambda: [0.1, 0.5],
        description="Candidate traffic share at each canary step, e.g. 10 % then 50 %.",
    )
    step_min_requests: int = Field(
        50, ge=1, description="Candidate requests at one step (guardrails intact) before ramping to the next."
    )
    min_samples: int = Field(100, ge=1, description="Rated requests per arm before a promotion is considered.")
    certainty: float = Field(
        0.95, gt=0.5, lt=1, description="P(candidate beats champion) needed to promote (with a significant test)."
    )
    worse_certainty: float = Field(
        0.99, gt=0.5, lt=1, description="P(candidate is worse) at which the canary is rolled back early."
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="Level of the sequential (always-valid) test.")
    max_duration_h: float = Field(72.0, gt=0, description="After this long without a win, keep the champion.")
    guardrails: CanaryGuardrails = Field(
        default_factory=lambda: CanaryGuardrails(), description="Candidate guardrails."
    )
    request_timeout_s: float = Field(600.0, gt=0, description="Timeout of one admin call to a gateway.")

    @field_validator("ramp")
    @classmethod
    def _ramp_is_increasing(cls, ramp: list[float]) -> list[float]:
        if not ramp or any(not 0 < r < 1 for r in ramp) or ramp != sorted(ramp):
            raise ValueError("ramp must be increasing shares between 0 and 1, e.g. [0.1, 0.5]")
        return ramp

    @field_validator("gateway_urls")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        return http_urls(urls, "gateway URL")


class AliasCycle(BaseModel):
    """One alias the nightly cycle retrains."""

    model_config = ConfigDict(extra="forbid")
    recipe: Path = Field(description="Training recipe (YAML) for this alias.")
    min_new_rows: int = Field(
        50,
        ge=1,
        validation_alias=AliasChoices("min_new_rows", "min_new_feedback"),
        description="Training rows needed to retrain: SFT rows plus preference pairs of this alias that the export "
        "would give since the watermark (the last run's, or the current champion's promotion if later), before "
        "cleaning. The recipe's `data.prepare.min_rows` counts the same rows after cleaning and splitting, so set "
        "this to at least min_rows / the train share. (`min_new_feedback`, its former name, is still read.)",
    )


class CycleConfig(BaseModel):
    """What `loraloop cycle` does each night."""

    model_config = ConfigDict(extra="forbid")
    aliases: dict[str, AliasCycle] = Field(default_factory=dict, description="Aliases to retrain, by name.")
    state_dir: Path = Field(paths.CYCLE_STATE_DIR, description="Lock file, watermarks and the last cycle's status.")
