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
    model_config = ConfigDict(extra="forbid")
    alias: str
    arms: list[Arm] = Field(min_length=2)
    control: str | None = None
    id: str | None = None
    salt: str | None = None
    end: datetime | None = None
    primary_metric: str = "thumbs_up_rate"
    guardrails: Guardrails | None = None
    description: str = ""


class UpdateExperiment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: dict[str, float] | None = None
    end: datetime | None = None
    guardrails: Guardrails | None = None
    description: str | None = None


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
