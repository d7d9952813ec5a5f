"""The one client of the gateway's admin API, for the `loraloop adapters` command and the promotion
controller: ``AdminClient`` talks to one gateway replica, ``GatewayFleet`` makes the same call on every
replica. Errors come back as one line naming the replica and what it answered (``GatewayError``)."""

from __future__ import annotations

from typing import Any

import httpx

from core.errors import LoraloopError
from core.settings import Settings


class GatewayError(LoraloopError, RuntimeError):
    """An admin call failed on one replica; the message names it and what it answered."""


class AdminClient:
    """Admin API calls against one gateway replica (adapters, alias pointers, experiments)."""

    def __init__(self, url: str, admin_key: str, timeout_s: float = 600.0) -> None:
        if not admin_key:
            raise GatewayError("no admin key: set LORALOOP_ADMIN_KEY")
        self.url = url.rstrip("/")
        self._client = httpx.Client(headers={"Authorization": f"Bearer {admin_key}"}, timeout=timeout_s)

    def close(self) -> None:
        self._client.close()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One admin call; the decoded JSON answer, or GatewayError with the gateway's own message."""
        try:
            resp = self._client.request(method, f"{self.url}{path}", json=body)
        except httpx.HTTPError as exc:
            raise GatewayError(f"cannot reach the gateway at {self.url}: {type(exc).__name__}: {exc}") from None
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:300]
            raise GatewayError(f"{self.url}{path}: HTTP {resp.status_code}: {message}")
        return resp.json()

    # adapters and alias pointers -------------------------------------------------------------------
    def adapters(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.call("GET", "/admin/adapters")["data"]
        return rows

    def register_adapter(self, name: str, path: str) -> dict[str, Any]:
        """Idempotent for the same path: validated and loaded on every back-end of this replica."""
        out: dict[str, Any] = self.call("POST", "/admin/adapters", {"name": name, "path": path})
        return out

    def unload_adapter(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self.call("DELETE", f"/admin/adapters/{name}")
        return out

    def aliases(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.call("GET", "/admin/aliases")["data"]
        return rows

    def point(self, alias: str, adapter: str | None) -> dict[str, Any]:
        out: dict[str, Any] = self.call("PUT", f"/admin/aliases/{alias}", {"adapter": adapter})
        return out

    # experiments ------------------------------------------------------------------------------------
    def create_experiment(self, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self.call("POST", "/admin/experiments", body)
        return out

    def update_experiment(self, experiment_id: str, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self.call("PATCH", f"/admin/experiments/{experiment_id}", body)
        return out

    def stop_experiment(self, experiment_id: str) -> None:
        self.call("POST", f"/admin/experiments/{experiment_id}/stop")


class GatewayFleet:
    """The same admin call on every gateway replica; experiments live in the shared store, so one replica
    is enough for those."""

    def __init__(self, urls: list[str], admin_key: str, timeout_s: float = 600.0) -> None:
        if not urls:
            raise GatewayError("no gateway URL configured (promotion.gateway_urls)")
        if not admin_key:
            raise GatewayError("the promotion controller needs the admin key (LORALOOP_ADMIN_KEY)")
        self.urls = urls
        self.replicas = [AdminClient(url, admin_key, timeout_s) for url in urls]

    @classmethod
    def from_settings(cls, settings: Settings) -> GatewayFleet:
        """Every replica in `promotion.gateway_urls` (empty: this machine's gateway at host:port)."""
        key = settings.admin_key.get_secret_value() if settings.admin_key else ""
        urls = settings.promotion.gateway_urls or [settings.admin_url]
        return cls(urls, key, settings.promotion.request_timeout_s)

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()

    def register_adapter(self, name: str, path: str) -> None:
        """Idempotent for the same path: validated and loaded on every replica's back-ends."""
        for replica in self.replicas:
            replica.register_adapter(name, path)

    def point(self, alias: str, adapter: str | None) -> None:
        for replica in self.replicas:
            replica.point(alias, adapter)

    def alias_targets(self, alias: str) -> dict[str, str | None]:
        """What each replica's alias points to (None: the base)."""
        out = {}
        for replica in self.replicas:
            out[replica.url] = next((r["adapter"] for r in replica.aliases() if r["alias"] == alias), None)
        return out

    def create_experiment(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.replicas[0].create_experiment(body)

    def update_experiment(self, experiment_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.replicas[0].update_experiment(experiment_id, body)

    def stop_experiment(self, experiment_id: str) -> None:
        self.replicas[0].stop_experiment(experiment_id)


__all__ = ["AdminClient", "GatewayError", "GatewayFleet"]
