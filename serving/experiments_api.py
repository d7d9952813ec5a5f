"""Admin API for experiments (admin key): create, change, stop, list, report. The arms' adapters are
loaded on every back-end before an experiment starts splitting traffic."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, ConfigDict, Field

from feedback.experiments import Arm, Experiment, ExperimentError, Guardrails
from feedback.report import build_report

from .dependencies import AdaptersDep, AdminKey, ExperimentsDep, SettingsDep
from .errors import OpenAIError

router = APIRouter(prefix="/admin/experiments")


class CreateExperiment(BaseModel):
    """Body of POST /admin/experiments."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "alias": "support", "id": "support-prompt-ab", "control": "current",
        "arms": [{"name": "current", "adapter": "support-v2", "weight": 0.9},
                 {"name": "new", "adapter": "support-v3", "weight": 0.1}],
        "guardrails": {"error_rate_max": 0.02, "p95_latency_ms_max": 1500}, "description": "v3 at 10 %",
    }]})  # fmt: skip
    alias: str = Field(description="The alias whose traffic is split (it must exist).")
    arms: list[Arm] = Field(min_length=2, description="Two or more arms; each adapter must be registered.")
    control: str | None = Field(None, description="The control arm's name (default: the first arm).")
    id: str | None = Field(None, description="The experiment's id (default: generated).")
    salt: str | None = Field(None, description="Hash salt of the sticky assignment (default: random).")
    end: datetime | None = Field(None, description="When the split stops (ISO 8601; default: until stopped).")
    primary_metric: str = Field(
        "thumbs_up_rate", description="What decides the winner: `thumbs_up_rate` or `mean_score`."
    )
    guardrails: Guardrails | None = Field(None, description="Limits every arm must respect (default: 5 % errors).")
    description: str = Field("", description="Free text.")


class UpdateExperiment(BaseModel):
    """Body of PATCH /admin/experiments/{experiment_id}: only the fields given change."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"weights": {"current": 0.5,
                                                                                           "new": 0.5}}]})  # fmt: skip
    weights: dict[str, float] | None = Field(
        None, description="New relative weights by arm name; users move between arms as little as possible."
    )
    end: datetime | None = Field(None, description="A new end time (ISO 8601).")
    guardrails: Guardrails | None = Field(None, description="New guardrails.")
    description: str | None = Field(None, description="New free text.")


def _bad(exc: Exception) -> OpenAIError:
    return OpenAIError(400, str(exc), code="invalid_experiment")


async def _load_arms(arms: list[Arm], adapters: AdaptersDep) -> None:
    for arm in arms:
        if arm.adapter is None:
            continue
        if arm.adapter not in adapters.adapters:
            raise OpenAIError(
                404, f"arm {arm.name!r}: adapter {arm.adapter!r} is not registered", code="adapter_not_found"
            )
        await adapters.ensure_loaded(arm.adapter)


@router.get("")
async def list_experiments(repo: ExperimentsDep, _: AdminKey, alias: str | None = None) -> dict[str, Any]:
    exps = await anyio.to_thread.run_sync(lambda: repo.list(alias))
    return {"object": "list", "data": [e.model_dump(mode="json") for e in exps]}


@router.post("", status_code=201)
async def create_experiment(
    body: CreateExperiment, repo: ExperimentsDep, adapters: AdaptersDep, settings: SettingsDep, _: AdminKey
) -> dict[str, Any]:
    if body.alias not in settings.aliases:
        raise OpenAIError(404, f"alias {body.alias!r} does not exist", code="model_not_found")
    await _load_arms(body.arms, adapters)
    try:
        exp: Experiment = await anyio.to_thread.run_sync(
            lambda: repo.create(
                body.alias,
                body.arms,
                body.control,
                id=body.id,
                salt=body.salt,
                end=body.end,
                primary_metric=body.primary_metric,  # type: ignore[arg-type]
                guardrails=body.guardrails,
                description=body.description,
                actor="admin-api",
            )
        )
    except (ExperimentError, ValueError) as exc:
        raise _bad(exc) from None
    return exp.model_dump(mode="json")


@router.patch("/{experiment_id}")
async def update_experiment(
    experiment_id: str, body: UpdateExperiment, repo: ExperimentsDep, _: AdminKey
) -> dict[str, Any]:
    try:
        exp: Experiment = await anyio.to_thread.run_sync(
            lambda: repo.update(
                experiment_id,
                weights=body.weights,
                end=body.end,
                guardrails=body.guardrails,
                description=body.description,
                actor="admin-api",
            )
        )
    except (ExperimentError, ValueError) as exc:
        raise _bad(exc) from None
    return exp.model_dump(mode="json")


@router.post("/{experiment_id}/stop")
async def stop_experiment(experiment_id: str, repo: ExperimentsDep, _: AdminKey) -> dict[str, Any]:
    try:
        exp: Experiment = await anyio.to_thread.run_sync(lambda: repo.stop(experiment_id, actor="admin-api"))
    except ExperimentError as exc:
        raise OpenAIError(404, str(exc), code="experiment_not_found") from None
    return exp.model_dump(mode="json")


@router.get("/{experiment_id}/report")
async def experiment_report(experiment_id: str, settings: SettingsDep, _: AdminKey) -> dict[str, Any]:
    try:
        report = await anyio.to_thread.run_sync(lambda: build_report(settings.store.root, experiment_id))
    except ExperimentError as exc:
        raise OpenAIError(404, str(exc), code="experiment_not_found") from None
    return {
        "experiment": experiment_id,
        "winner": report.winner,
        "decision": report.decision,
        "table": report.to_table(),
    }


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
