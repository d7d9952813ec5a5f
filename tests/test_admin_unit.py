"""Admin API and adapter manager, in process against the fake vLLM."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from serving.app import build_app
from tests.adapter_factory import with_pickle
from tests.conftest import FakeBackends
from tests.test_gateway_unit import ADMIN_KEY, API_KEY, Gateway, assert_openai_error, make_settings

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = {"model": "support", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def gw(
    tmp_path: Path, tiny_model_dir: Path, adapter_root: Path, fake_vllm: FakeBackends
) -> AsyncIterator[Gateway]:
    app = build_app(make_settings(tmp_path, tiny_model_dir, adapter_root, fake_vllm.urls))
    async with app.router.lifespan_context(app):
        await app.state.pool.check_all()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw", headers=ADMIN) as c:
            yield Gateway(app, fake_vllm.app, c, fake_vllm.urls)


async def test_admin_auth(gw: Gateway, tmp_path: Path, tiny_model_dir: Path, adapter_root: Path) -> None:
    assert_openai_error(await gw.client.get("/admin/adapters", headers={"Authorization": ""}), 401)
    api = await gw.client.get("/admin/adapters", headers={"Authorization": f"Bearer {API_KEY}"})
    assert assert_openai_error(api, 403)["code"] == "admin_key_required"
    assert (await gw.client.get("/admin/adapters")).status_code == 200
    no_admin = build_app(make_settings(tmp_path / "x", tiny_model_dir, adapter_root, admin_key=None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=no_admin), base_url="http://gw") as c:
        resp = await c.get("/admin/aliases", headers={"Authorization": f"Bearer {API_KEY}"})
        assert assert_openai_error(resp, 403)["code"] == "admin_disabled"
    await no_admin.state.pool.client.aclose()


async def test_configured_adapter_loaded_on_join(gw: Gateway) -> None:
    assert gw.fake.state.adapters == {"support-v1"}
    listing = (await gw.client.get("/admin/adapters")).json()
    entry = listing["data"][0]
    assert entry["name"] == "support-v1" and entry["aliases"] == ["support"] and entry["rank"] == 4
    assert entry["backends"] == {url: True for url in gw.fake_urls}


async def test_register_point_and_drain(gw: Gateway) -> None:
    resp = await gw.client.post("/admin/adapters", json={"name": "support-v2", "path": "support-v2"})
    assert resp.status_code == 201, resp.text
    assert "support-v2" in gw.fake.state.adapters
    manager = gw.app.state.adapters
    held = gw.app.state.serving.resolver.resolve("support")  # a request in flight on the old adapter
    assert held.adapter == "support-v1"
    resp = await gw.client.put("/admin/aliases/support", json={"adapter": "support-v2"})
    assert resp.json() == {"alias": "support", "adapter": "support-v2", "previous": "support-v1"}
    chat = await gw.client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {API_KEY}"})
    assert chat.headers["x-loraloop-adapter"] == "support-v2" and gw.last["model"] == "support-v2"
    assert ("unload", "support-v1") not in gw.fake.state.ops  # still in flight
    gw.app.state.serving.resolver.release(held)
    await manager.wait_background()
    assert ("unload", "support-v1") in gw.fake.state.ops and "support-v1" not in gw.fake.state.adapters
    metrics = (await gw.client.get("/metrics")).text
    assert 'loraloop_alias_adapter{adapter="support-v2",alias="support"} 1.0' in metrics
    assert 'alias_adapter{adapter="support-v1"' not in metrics
    assert 'loraloop_adapter_operations_total{op="unload",result="ok"}' in metrics
    back = await gw.client.put("/admin/aliases/support", json={"adapter": None})
    assert back.json()["previous"] == "support-v2"


async def test_hostile_adapters_refused(gw: Gateway, adapter_root: Path) -> None:
    # A path that leaves the adapter root is refused as outside_root whether or not it exists: containment
    # is checked before the file system is asked, so the admin API never says what exists outside the root.
    for outside in ("../../etc", "/etc", "/no-such-dir-anywhere", str(adapter_root / ".." / "no-such-dir")):
        bad = await gw.client.post("/admin/adapters", json={"name": "evil", "path": outside})
        assert assert_openai_error(bad, 400, "path")["code"] == "outside_root", outside
    missing = await gw.client.post("/admin/adapters", json={"name": "missing", "path": "no-such-adapter"})
    assert assert_openai_error(missing, 400, "path")["code"] == "not_found"  # inside the root: it may say so
    with_pickle(adapter_root / "support-v1", adapter_root / "pickled")
    resp = await gw.client.post("/admin/adapters", json={"name": "pickled", "path": "pickled"})
    assert assert_openai_error(resp, 400)["code"] == "pickled_weights"
    assert not any(op[1] in ("evil", "missing", "pickled") for op in gw.fake.state.ops)  # vLLM never saw them
    assert_openai_error(await gw.client.post("/admin/adapters", json={"name": "a b", "path": "x"}), 400)


async def test_conflicts_and_unknowns(gw: Gateway) -> None:
    assert assert_openai_error(await gw.client.delete("/admin/adapters/support-v1"), 409)["code"] == "adapter_in_use"
    assert_openai_error(await gw.client.delete("/admin/adapters/nope"), 404)
    assert_openai_error(await gw.client.put("/admin/aliases/support", json={"adapter": "nope"}), 404)
    assert_openai_error(await gw.client.put("/admin/aliases/nope", json={"adapter": None}), 404)
    other = await gw.client.post("/admin/adapters", json={"name": "support-v1", "path": "support-v2"})
    assert assert_openai_error(other, 409)["code"] == "adapter_exists"


async def test_state_survives_restart(gw: Gateway, tmp_path: Path, tiny_model_dir: Path, adapter_root: Path) -> None:
    await gw.client.post("/admin/adapters", json={"name": "support-v2", "path": "support-v2"})
    await gw.client.put("/admin/aliases/support", json={"adapter": "support-v2"})
    again = build_app(make_settings(tmp_path, tiny_model_dir, adapter_root))
    assert again.state.adapters.routes["support"] == "support-v2"
    await again.state.pool.client.aclose()


async def test_rejoining_backend_gets_adapters_before_traffic(gw: Gateway) -> None:
    await gw.client.post("/admin/adapters", json={"name": "support-v2", "path": "support-v2"})
    await gw.client.put("/admin/aliases/plain", json={"adapter": "support-v2"})
    gw.fake.state.adapters.clear()  # the vLLM server restarted: nothing loaded
    gw.fake.state.healthy = False
    await gw.app.state.pool.check_all()
    gw.fake.state.healthy = True
    await gw.app.state.pool.check_all()
    assert gw.fake.state.adapters == {"support-v1", "support-v2"}
