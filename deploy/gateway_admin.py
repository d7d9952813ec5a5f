"""The promotion controller's view of the gateway fleet: the same admin call on every replica."""

from __future__ import annotations

from typing import Any

import httpx


class GatewayError(RuntimeError):
    """An admin call failed on one replica; the message names it and what it answered."""


class GatewayFleet:
    """Admin API calls against every gateway replica (adapters, alias pointers, experiments)."""

    def __init__(self, urls: list[str], admin_key: str, timeout_s: float = 600.0) -> None:
        if not urls:
            raise GatewayError("no gateway URL configured (promotion.gateway_urls)")
        if not admin_key:
            raise GatewayError("the promotion controller needs the admin key (LORALOOP_ADMIN_KEY)")
        self.urls = urls
        self._client = httpx.Client(headers={"Authorization": f"Bearer {admin_key}"}, timeout=timeout_s)

    def close(self) -> None:
        self._client.close()

    def _call(self, url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            resp = self._client.request(method, f"{url}{path}", json=body)
        except httpx.HTTPError as exc:
            raise GatewayError(f"{url}: {type(exc).__name__}: {exc}") from None
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:300]
            raise GatewayError(f"{url}{path}: HTTP {resp.status_code}: {message}")
        return resp.json()

    # every replica ------------------------------------------------------------------------------
    def register_adapter(self, name: str, path: str) -> None:
        """Idempotent for the same path: validated and loaded on every replica's back-ends."""
        for url in self.urls:
            self._call(url, "POST", "/admin/adapters", {"name": name, "path": path})

    def point(self, alias: str, adapter: str | None) -> None:
        for url in self.urls:
            self._call(url, "PUT", f"/admin/aliases/{alias}", {"adapter": adapter})

    def alias_targets(self, alias: str) -> dict[str, str | None]:
        out = {}
        for url in self.urls:
            rows = self._call(url, "GET", "/admin/aliases")["data"]
            out[url] = next((r["adapter"] for r in rows if r["alias"] == alias), None)
        return out

    # experiments live in the shared store: one replica is enough --------------------------------
    def create_experiment(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call(self.urls[0], "POST", "/admin/experiments", body)
        return result

    def update_experiment(self, experiment_id: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call(self.urls[0], "PATCH", f"/admin/experiments/{experiment_id}", body)
        return result

    def stop_experiment(self, experiment_id: str) -> None:
        self._call(self.urls[0], "POST", f"/admin/experiments/{experiment_id}/stop")
