"""A/B experiments on an alias: definitions, sticky assignment and their versioned storage.

Storage: ``<root>/_experiments/<id>/v<version>.json``, one immutable file per version, created
with an exclusive link (compare-and-swap: two concurrent updates cannot both write version n).
Every process reads the latest version of each experiment; a gateway caches them and re-reads
at most every ``refresh_s`` seconds, so all replicas see a change within that time without
talking to each other. No database lock is involved.
"""

from __future__ import annotations

import builtins
import os
import random
import re
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from core.errors import UsageError
from feedback.buckets import Layout, arm_at, bucket_of, initial_layout, rebalance
from feedback.events import AssignmentEvent, new_id, utcnow
from feedback.fsutil import FileLock, atomic_write_bytes

PrimaryMetric = Literal["thumbs_up_rate", "mean_score"]
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_VERSION = re.compile(r"^v(\d{6})\.json$")


class ExperimentError(UsageError, ValueError):
    """An invalid experiment definition or change (one-line message for the admin)."""


class Arm(BaseModel):
    """One arm: the base model (``adapter`` None) or an adapter, with a relative weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="Arm name, unique within the experiment.")
    adapter: str | None = Field(default=None, description="LoRA adapter; None = the base model.")
    weight: float = Field(default=1.0, ge=0, description="Relative share of users (need not sum to 1).")


class Guardrails(BaseModel):
    """Limits an arm must respect; a violated guardrail blocks declaring that arm a winner."""

    model_config = ConfigDict(extra="forbid")

    error_rate_max: float | None = Field(default=0.05, ge=0, le=1, description="Share of requests with status >= 500.")
    p95_latency_ms_max: float | None = Field(default=None, gt=0, description="95th percentile latency, ms.")
    negative_feedback_rate_max: float | None = Field(
        default=None, ge=0, le=1, description="Share of thumbs-rated requests rated down."
    )


class Experiment(BaseModel):
    """One experiment on one alias. ``layout`` is derived from the weights and is part of the record."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Unique id.")
    alias: str = Field(description="The alias whose traffic is split.")
    arms: list[Arm] = Field(min_length=1, description="The arms.")
    control: str = Field(description="Name of the control arm.")
    salt: str = Field(description="Hash salt; changing it reshuffles every user.")
    start: datetime = Field(description="Traffic is split from this time on.")
    end: datetime | None = Field(default=None, description="... until this time (None: until stopped).")
    status: Literal["running", "stopped"] = Field(default="running", description="Stopped experiments split nothing.")
    primary_metric: PrimaryMetric = Field(default="thumbs_up_rate", description="What decides the winner.")
    guardrails: Guardrails = Field(default_factory=Guardrails, description="Limits checked per arm.")
    description: str = Field(default="", description="Free text.")
    layout: Layout = Field(default_factory=list, description="Bucket ranges → arm (see feedback/buckets.py).")
    layout_since: datetime | None = Field(
        default=None, description="When the current bucket layout (the weights) took effect; None: since start."
    )
    version: int = Field(default=1, ge=1, description="Incremented by every change.")
    created: datetime = Field(default_factory=utcnow, description="Creation time.")
    updated: datetime = Field(default_factory=utcnow, description="Time of this version.")
    changed_by: str = Field(default="unknown", description="Who made this version.")

    _arms_by_name: dict[str, Arm] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Experiment:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError("arm names must be unique")
        if self.control not in names:
            raise ValueError(f"control arm {self.control!r} is not one of the arms {names}")
        if sum(a.weight for a in self.arms) <= 0:
            raise ValueError("at least one arm needs a positive weight")
        for attr in ("start", "end", "created", "updated", "layout_since"):
            value = getattr(self, attr)
            if value is not None and value.tzinfo is None:
                setattr(self, attr, value.replace(tzinfo=UTC))
        if self.end is not None and self.end <= self.start:
            raise ValueError("end must be after start")
        if not self.layout:
            self.layout = initial_layout(names, [a.weight for a in self.arms])
        self._arms_by_name = {a.name: a for a in self.arms}
        return self

    def arm(self, name: str) -> Arm:
        """The arm called ``name``."""
        return self._arms_by_name[name]

    def is_active(self, now: datetime | None = None) -> bool:
        """Running and inside its time window."""
        now = now or utcnow()
        return self.status == "running" and self.start <= now and (self.end is None or now < self.end)


def assign_arm(exp: Experiment, user: str | None, rng: random.Random | None = None) -> Arm:
    """The arm for ``user``: sticky and identical on every replica; random per request without a user."""
    if user is None:
        chooser = rng or random
        return chooser.choices(exp.arms, weights=[a.weight for a in exp.arms])[0]
    return exp.arm(arm_at(exp.layout, bucket_of(exp.salt, user)))


def exposure(exp: Experiment, arm: Arm, user: str | None, request_id: str | None = None) -> AssignmentEvent:
    """The assignment event to log when ``user`` is served by ``arm``."""
    return AssignmentEvent(experiment_id=exp.id, alias=exp.alias, arm=arm.name, user=user, request_id=request_id)


class ExperimentRepo:
    """Experiments stored under ``<root>/_experiments``; usable from gateways, admin API and CLI."""

    def __init__(self, root: Path | str, refresh_s: float = 2.0) -> None:
        self.root = Path(root)
        self.dir = self.root / "_experiments"
        self.refresh_s = refresh_s
        self._cache: dict[str, tuple[str, Experiment]] = {}
        self._loaded_at = -1e18
        self._lock = threading.Lock()

    # --- reading -----------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the latest version of every experiment (unchanged ones are not parsed again)."""
        fresh: dict[str, tuple[str, Experiment]] = {}
        try:
            dirs = [e for e in os.scandir(self.dir) if e.is_dir() and _ID.match(e.name)]
        except FileNotFoundError:
            dirs = []
        for d in dirs:
            versions = [e.name for e in os.scandir(d.path) if _VERSION.match(e.name)]
            if not versions:
                continue
            latest = max(versions)
            cached = self._cache.get(d.name)
            if cached and cached[0] == latest:
                fresh[d.name] = cached
                continue
            exp = Experiment.model_validate_json(Path(d.path, latest).read_bytes())
            fresh[d.name] = (latest, exp)
        with self._lock:
            self._cache = fresh
            self._loaded_at = time.monotonic()

    def _current(self, max_age: float | None = None) -> dict[str, Experiment]:
        age = self.refresh_s if max_age is None else max_age
        if time.monotonic() - self._loaded_at >= age:
            self.refresh()
        return {k: v[1] for k, v in self._cache.items()}

    def get(self, experiment_id: str) -> Experiment:
        """The latest version; raises ExperimentError when unknown."""
        exp = self._current(0).get(experiment_id)
        if exp is None:
            raise ExperimentError(f"no experiment {experiment_id!r}")
        return exp

    def list(self, alias: str | None = None) -> list[Experiment]:
        """All experiments (optionally of one alias), newest first."""
        exps = [e for e in self._current(0).values() if alias is None or e.alias == alias]
        return sorted(exps, key=lambda e: (e.created, e.id), reverse=True)

    def active_for(self, alias: str, now: datetime | None = None) -> Experiment | None:
        """The running experiment of ``alias`` (from the cache, at most ``refresh_s`` old)."""
        for exp in self._current().values():
            if exp.alias == alias and exp.is_active(now):
                return exp
        return None

    def assign(self, alias: str, user: str | None, request_id: str | None = None) -> tuple[Experiment, Arm] | None:
        """The active experiment of ``alias`` and the arm for ``user``, or None."""
        exp = self.active_for(alias)
        return None if exp is None else (exp, assign_arm(exp, user))

    # --- writing -----------------------------------------------------------------------------------

    def create(
        self,
        alias: str,
        arms: builtins.list[Arm],
        control: str | None = None,
        *,
        id: str | None = None,
        salt: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        primary_metric: PrimaryMetric = "thumbs_up_rate",
        guardrails: Guardrails | None = None,
        description: str = "",
        actor: str = "unknown",
    ) -> Experiment:
        """Create and persist a running experiment; at most one may run on an alias at a time."""
        now = utcnow()
        exp_id = id or f"{alias}-{now:%Y%m%d}-{new_id()[:6]}"
        if not _ID.match(exp_id):
            raise ExperimentError(f"experiment id {exp_id!r} must match {_ID.pattern}")
        try:
            exp = Experiment(
                id=exp_id,
                alias=alias,
                arms=arms,
                control=control or arms[0].name,
                salt=salt or new_id(),
                start=start or now,
                end=end,
                primary_metric=primary_metric,
                guardrails=guardrails or Guardrails(),
                description=description,
                created=now,
                updated=now,
                changed_by=actor,
            )
        except ValueError as exc:
            raise ExperimentError(_one_line(exc)) from None
        with FileLock(self.dir / ".lock").held():
            current = self._current(0)
            if exp_id in current:
                raise ExperimentError(f"experiment {exp_id!r} already exists")
            for other in current.values():
                if other.alias == alias and other.status == "running" and _overlap(other, exp):
                    raise ExperimentError(f"experiment {other.id!r} is already running on alias {alias!r}")
            self._write(exp)
        return exp

    def update(
        self,
        experiment_id: str,
        *,
        arms: builtins.list[Arm] | None = None,
        weights: dict[str, float] | None = None,
        control: str | None = None,
        end: datetime | None = None,
        primary_metric: PrimaryMetric | None = None,
        guardrails: Guardrails | None = None,
        description: str | None = None,
        salt: str | None = None,
        actor: str = "unknown",
    ) -> Experiment:
        """Persist a new version. Changed arms or weights move the fewest users possible."""
        with FileLock(self.dir / ".lock").held():
            exp = self.get(experiment_id)
            new_arms = list(arms) if arms is not None else list(exp.arms)
            if weights:
                unknown = set(weights) - {a.name for a in new_arms}
                if unknown:
                    raise ExperimentError(f"unknown arms {sorted(unknown)}")
                new_arms = [a.model_copy(update={"weight": weights.get(a.name, a.weight)}) for a in new_arms]
            data = exp.model_dump()
            data.update(
                arms=[a.model_dump() for a in new_arms],
                version=exp.version + 1,
                updated=utcnow(),
                changed_by=actor,
            )
            for key, value in (
                ("control", control),
                ("end", end),
                ("primary_metric", primary_metric),
                ("description", description),
                ("salt", salt),
            ):
                if value is not None:
                    data[key] = value
            if guardrails is not None:
                data["guardrails"] = guardrails.model_dump()
            try:
                data["layout"] = rebalance(
                    exp.layout if salt is None else [],
                    [a.name for a in new_arms],
                    [a.weight for a in new_arms],
                )
                if data["layout"] != exp.layout:  # users move between arms from now on
                    data["layout_since"] = data["updated"]
                new = Experiment.model_validate(data)
            except ValueError as exc:
                raise ExperimentError(_one_line(exc)) from None
            self._write(new)
            return new

    def stop(self, experiment_id: str, actor: str = "unknown") -> Experiment:
        """Stop the experiment now (its data stays; the alias goes back to its own adapter)."""
        with FileLock(self.dir / ".lock").held():
            exp = self.get(experiment_id)
            if exp.status == "stopped":
                return exp
            now = utcnow()
            data = exp.model_dump()
            end = exp.end if exp.end is not None and exp.end <= now else max(now, exp.start)
            data.update(
                status="stopped",
                end=end if end > exp.start else None,
                version=exp.version + 1,
                updated=now,
                changed_by=actor,
            )
            new = Experiment.model_validate(data)
            self._write(new)
            return new

    def _write(self, exp: Experiment) -> None:
        directory = self.dir / exp.id
        directory.mkdir(parents=True, exist_ok=True)
        if not atomic_write_bytes(
            directory / f"v{exp.version:06d}.json", exp.model_dump_json(indent=2).encode(), exclusive=True
        ):
            raise ExperimentError(f"experiment {exp.id!r} was changed concurrently; retry")
        self._loaded_at = -1e18  # our own change is visible at once


def _overlap(a: Experiment, b: Experiment) -> bool:
    a_end = a.end or datetime.max.replace(tzinfo=UTC)
    b_end = b.end or datetime.max.replace(tzinfo=UTC)
    return a.start < b_end and b.start < a_end


def _one_line(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(str(e.get("msg", "")).removeprefix("Value error, ") for e in errors())
    return str(exc).replace("\n", " ")
