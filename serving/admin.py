"""Admin API: adapters and alias pointers. Every route needs the admin key (401 without a valid key,
403 with the API key, and refused entirely when no admin key is configured)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, ConfigDict, Field

from .adapter_checks import AdapterRejected, ValidatedAdapter
from .adapters import AdapterManager
from .dependencies import AdaptersDep, AdminKey
from .errors import OpenAIError

router = APIRouter(prefix="/admin")


class RegisterAdapter(BaseModel):
    """Body of POST /admin/adapters."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "support-v3",
                                                                                "path": "support-v3"}]})  # fmt: skip
    name: str = Field(
        min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="The adapter's name: what aliases and experiment arms refer to.",
    )  # fmt: skip
    path: str = Field(min_length=1, description="Directory under the adapter root (relative or absolute).")


class PointAlias(BaseModel):
    """Body of PUT /admin/aliases/{alias}."""

    # (an example with `null` is not offered: pydantic drops None values from schema examples)
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"adapter": "support-v3"}]})
    adapter: str | None = Field(description="Registered adapter name, or null for the base model.")


def _describe(name: str, adapter: ValidatedAdapter, manager: AdapterManager) -> dict[str, Any]:
    return {
        "name": name,
        "path": str(adapter.path),
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "target_modules": sorted(adapter.target_modules),
        "size_bytes": adapter.size_bytes,
        "aliases": sorted(a for a, target in manager.routes.items() if target == name),
        "in_flight": manager.in_flight[name],
    }


@router.get("/adapters")
async def list_adapters(manager: AdaptersDep, _: AdminKey) -> dict[str, Any]:
    loaded = await manager.backend_state()
    data = []
    for name, adapter in sorted(manager.adapters.items()):
        entry = _describe(name, adapter, manager)
        entry["backends"] = {url: name in st if isinstance(st, list) else st for url, st in loaded.items()}
        data.append(entry)
    return {"object": "list", "data": data, "backends": loaded}


@router.post("/adapters", status_code=201)
async def register_adapter(body: RegisterAdapter, manager: AdaptersDep, _: AdminKey) -> dict[str, Any]:
    try:
        adapter = await manager.register(body.name, body.path)
    except AdapterRejected as exc:
        raise OpenAIError(400, str(exc), param="path", code=exc.code) from None
    return _describe(body.name, adapter, manager)


@router.delete("/adapters/{name}")
async def unregister_adapter(name: str, manager: AdaptersDep, _: AdminKey) -> dict[str, Any]:
    await manager.unregister(name)
    return {"name": name, "deleted": True}


@router.get("/aliases")
async def list_aliases(manager: AdaptersDep, _: AdminKey) -> dict[str, Any]:
    return {"object": "list", "data": [{"alias": a, "adapter": t} for a, t in manager.routes.items()]}


@router.put("/aliases/{alias}")
async def point_alias(alias: str, body: PointAlias, manager: AdaptersDep, _: AdminKey) -> dict[str, Any]:
    previous = await manager.point(alias, body.adapter)
    return {"alias": alias, "adapter": body.adapter, "previous": previous}


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
