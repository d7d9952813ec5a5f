"""Gateway unit tests in process (ASGI transport to the gateway) with a fake vLLM back-end."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from core.settings import Settings
from serving.app import GatewayApp, build_app
from tests.conftest import FakeBackends

API_KEY = "sk-unit-test-key-0001"
ADMIN_KEY = "adm-unit-test-key-0001"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def make_settings(
    tmp_path: Path, tiny_model_dir: Path, adapter_root: Path, backend_urls: list[str] | None = None, **extra: Any
) -> Settings:
    values: dict[str, Any] = {
        "model": str(tiny_model_dir),
        "api_key": API_KEY,
        "admin_key": ADMIN_KEY,
        "adapter_root": str(adapter_root),
        "state_dir": str(tmp_path / "state"),
        "store": {"root": str(tmp_path / "events"), "flush_interval_s": 0.01},
        "replica_id": "unit",
        "backends": {"mode": "remote", "urls": backend_urls or ["http://127.0.0.1:9"]},
        "adapters": {"support-v1": {"path": "support-v1"}},
        "aliases": {
            "plain": {},
            "support": {
                "adapter": "support-v1",
                "system_prompt": "You are a support agent.",
                "few_shot": [{"user": "hi", "assistant": "hello"}],
                "defaults": {"temperature": 0.2, "max_tokens": 9, "top_p": 0.9},
            },
        },
    }
    values.update(extra)
    return Settings(**values)


class Gateway:
    def __init__(self, app: FastAPI, fake: FastAPI, client: httpx.AsyncClient, fake_urls: list[str]) -> None:
        self.app, self.fake, self.client, self.fake_urls = app, fake, client, fake_urls

    @property
    def last(self) -> dict[str, Any]:
        received: list[dict[str, Any]] = self.fake.state.received
        return received[-1]


@pytest.fixture
async def gw(
    tmp_path: Path, tiny_model_dir: Path, adapter_root: Path, fake_vllm: FakeBackends
) -> AsyncIterator[Gateway]:
    settings = make_settings(tmp_path, tiny_model_dir, adapter_root, fake_vllm.urls)
    app = build_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.pool.check_all()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", headers=AUTH) as client:
            yield Gateway(app, fake_vllm.app, client, fake_vllm.urls)


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param
    return dict(err)


CHAT = {"model": "plain", "messages": [{"role": "user", "content": "ping"}]}


async def test_models_list_and_get(gw: Gateway) -> None:
    resp = await gw.client.get("/v1/models")
    assert resp.status_code == 200
    ids = [m["id"] for m in resp.json()["data"]]
    assert ids == ["plain", "support"]
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in resp.json()["data"])
    assert (await gw.client.get("/v1/models/support")).json()["id"] == "support"
    err = assert_openai_error(await gw.client.get("/v1/models/nope"), 404)
    assert err["code"] == "model_not_found"


async def test_auth(gw: Gateway) -> None:
    no_key = await gw.client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": ""})
    assert_openai_error(no_key, 401)
    bad = await gw.client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer wrong"})
    assert assert_openai_error(bad, 401)["code"] == "invalid_api_key"
    assert (await gw.client.get("/health", headers={"Authorization": ""})).status_code == 200
    assert (await gw.client.get("/metrics", headers={"Authorization": ""})).status_code == 200


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"messages": []}, "messages"),
        ({"n": 0}, "n"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"top_logprobs": 3}, None),
        ({"stream_options": {"include_usage": True}}, None),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ],
)
async def test_invalid_parameters_are_400(gw: Gateway, patch: dict[str, Any], param: str | None) -> None:
    resp = await gw.client.post("/v1/chat/completions", json={**CHAT, **patch})
    assert_openai_error(resp, 400, param)
    assert gw.fake.state.received == []  # refused before any back-end saw it


async def test_invalid_json_and_missing_model(gw: Gateway) -> None:
    resp = await gw.client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_openai_error(resp, 400)
    assert_openai_error(await gw.client.post("/v1/completions", json={"prompt": "x"}), 400, "model")
    assert_openai_error(await gw.client.post("/v1/chat/completions", json={**CHAT, "model": "ghost"}), 404)


async def test_oversized_and_non_object_bodies(gw: Gateway) -> None:
    limit = gw.app.state.settings.max_request_bytes
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * limit}]}
    assert (
        assert_openai_error(await gw.client.post("/v1/chat/completions", json=big), 413)["code"] == "request_too_large"
    )

    async def chunked() -> AsyncIterator[bytes]:  # no content-length: the size is counted while reading
        yield b'{"model": "plain", "prompt": "'
        yield b"x" * limit
        yield b'"}'

    assert_openai_error(await gw.client.post("/v1/completions", content=chunked()), 413)
    assert_openai_error(await gw.client.post("/v1/completions", json=["not", "an", "object"]), 400)
    assert gw.fake.state.received == []


async def test_alias_template_and_ids(gw: Gateway) -> None:
    body = {"model": "support", "messages": [{"role": "user", "content": "my order?"}], "temperature": 0.7}
    resp = await gw.client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["model"] == "support"
    assert data["id"] == resp.headers["x-request-id"] and data["id"].startswith("chatcmpl-")
    assert resp.headers["x-loraloop-adapter"] == "support-v1"
    sent = gw.last
    assert sent["model"] == "support-v1"
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "user"]
    assert sent["messages"][0]["content"] == "You are a support agent."
    assert sent["temperature"] == 0.7  # the request wins over the alias default
    assert sent["max_tokens"] == 9 and sent["top_p"] == 0.9  # defaults fill the gaps


async def test_request_system_prompt_wins_and_base_alias(gw: Gateway) -> None:
    body = {
        "model": "support",
        "messages": [{"role": "system", "content": "custom"}, {"role": "user", "content": "q"}],
        "max_completion_tokens": 3,
    }
    assert (await gw.client.post("/v1/chat/completions", json=body)).status_code == 200
    assert [m["content"] for m in gw.last["messages"]] == ["custom", "hi", "hello", "q"]
    assert "max_tokens" not in gw.last  # max_completion_tokens given: no default added
    resp = await gw.client.post("/v1/chat/completions", json=CHAT)
    assert resp.headers["x-loraloop-adapter"] == "base" and gw.last["model"] == "base"


async def test_completions_template(gw: Gateway) -> None:
    resp = await gw.client.post("/v1/completions", json={"model": "support", "prompt": "Q: status?"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["id"].startswith("cmpl-") and resp.json()["model"] == "support"
    assert gw.last["prompt"] == "You are a support agent.\n\nhi\nhello\n\nQ: status?"


def _events(text: str) -> list[Any]:
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            payload = block[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


async def test_the_built_gateway_streams_bodies_through_the_servers_send(gw: Gateway) -> None:
    """GatewayApp hands the server's send to the streamed responses only while no middleware is added
    (tests/test_streaming.py); the gateway as built adds none."""
    assert isinstance(gw.app, GatewayApp) and not gw.app.user_middleware


@pytest.mark.parametrize("include_usage", [False, True])
async def test_streaming_rewrites_ids_and_usage(gw: Gateway, include_usage: bool) -> None:
    body: dict[str, Any] = {**CHAT, "stream": True, "n": 2}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    resp = await gw.client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = _events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["id"] for c in chunks} == {resp.headers["x-request-id"]}
    assert {c["model"] for c in chunks} == {"plain"}
    usage_chunks = [c for c in chunks if c.get("usage")]
    assert len(usage_chunks) == (1 if include_usage else 0)
    assert gw.last["stream_options"]["include_usage"] is True  # always asked upstream, for metrics
    text0 = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]
                    and c["choices"][0]["index"] == 0)  # fmt: skip
    assert text0 == "echo ping"


async def test_backend_down_is_503_and_recovers(gw: Gateway) -> None:
    gw.fake.state.healthy = False
    await gw.app.state.pool.check_all()
    resp = await gw.client.post("/v1/chat/completions", json=CHAT)
    err = assert_openai_error(resp, 503)
    assert "no healthy vLLM back-end" in err["message"]
    assert (await gw.client.get("/health")).status_code == 503
    gw.fake.state.healthy = True
    await gw.app.state.pool.check_all()
    assert (await gw.client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_unreachable_backend_is_503(tmp_path: Path, tiny_model_dir: Path, adapter_root: Path) -> None:
    remote = {"mode": "remote", "urls": ["http://127.0.0.1:9"]}
    settings = make_settings(tmp_path, tiny_model_dir, adapter_root, backends=remote)
    app = build_app(settings)
    await app.state.pool.check_all()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", headers=AUTH) as c:
        assert_openai_error(await c.post("/v1/completions", json={"model": "plain", "prompt": "x"}), 503)
    await app.state.pool.client.aclose()
    await app.state.serving.upstream.aclose()


async def test_upstream_errors_are_mapped(gw: Gateway) -> None:
    gw.fake.state.fail_next = 400
    err = assert_openai_error(await gw.client.post("/v1/chat/completions", json=CHAT), 400)
    assert err["message"] == "boom" and err["code"] is None
    gw.fake.state.fail_next = 500
    assert_openai_error(await gw.client.post("/v1/chat/completions", json=CHAT), 502)
    gw.fake.state.garbage_next = True
    err = assert_openai_error(await gw.client.post("/v1/chat/completions", json=CHAT), 502)
    assert err["code"] == "backend_error"


async def test_passthrough_of_sampling_parameters(gw: Gateway) -> None:
    params = {
        "n": 2,
        "stop": ["\n"],
        "seed": 7,
        "logprobs": True,
        "top_logprobs": 2,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.1,
        "user": "u-1",
        "top_k": 5,
        "response_format": {"type": "json_object"},
    }
    resp = await gw.client.post("/v1/chat/completions", json={**CHAT, **params})
    assert resp.status_code == 200
    assert {k: gw.last[k] for k in params} == params  # fmt: skip


async def test_metrics_are_labelled(gw: Gateway) -> None:
    await gw.client.post("/v1/chat/completions", json={**CHAT, "model": "support"})
    await gw.client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    text = (await gw.client.get("/metrics")).text
    assert 'loraloop_requests_total{adapter="support-v1",alias="support",endpoint="chat",status="200"} 1.0' in text
    assert 'loraloop_completion_tokens_total{adapter="base",alias="plain"}' in text
    assert "loraloop_time_to_first_token_seconds_bucket" in text
    assert 'loraloop_requests_in_flight{alias="plain"} 0.0' in text
    assert f'loraloop_backend_up{{backend="{gw.fake_urls[0]}"}} 1.0' in text


async def test_stream_text_is_recorded_for_observers(gw: Gateway) -> None:
    seen = []
    gw.app.state.serving.observers.append(seen.append)
    body = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "alpha bravo charlie"}]}
    resp = await gw.client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200
    record = seen[-1]
    assert record.completion_text == "echo alpha bravo charlie"
    assert record.finish_reason == "stop" and record.completion_tokens == 4 and record.ttft_s is not None
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in _events(resp.text)[:-1] if c["choices"])
    assert streamed == record.completion_text


async def test_openapi_documents_the_generation_bodies(gw: Gateway) -> None:
    doc = (await gw.client.get("/openapi.json")).json()
    for path, field in (("/v1/chat/completions", "messages"), ("/v1/completions", "prompt")):
        schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert field in schema["properties"] and "model" in schema["required"]
    assert "#/$defs/" not in json.dumps(doc)  # nested models are inlined, no dangling references
