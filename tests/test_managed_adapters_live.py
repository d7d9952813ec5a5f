"""A managed vLLM that dies is restarted with its adapters: the gateway loads every adapter in use into the new
vLLM before it takes traffic again (docs/serving.md, "Back-ends"; serving/adapters.py, the join hook).

The session's own gateway is used — it has adapters configured (`labeler` -> `alpha`) — so the test costs one
vLLM restart rather than a second server; tests/test_managed_lifecycle.py covers the process side (a `serve`
subprocess, no adapters, nothing left behind)."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import ADMIN_KEY, LiveGateway
from tests.live_helpers import metric_value, vllm_url, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def ask(c: httpx.Client, alias: str, stream: bool) -> tuple[int, str, str]:
    """(status, answer, x-loraloop-adapter) of one greedy chat request."""
    body = {"model": alias, "messages": [{"role": "user", "content": "Label this."}], "stream": stream,
            "temperature": 0.0, "max_tokens": 8}  # fmt: skip
    resp = c.post("/v1/chat/completions", json=body)
    if resp.status_code != 200:
        return resp.status_code, resp.text, ""
    if not stream:
        return 200, resp.json()["choices"][0]["message"]["content"], resp.headers["x-loraloop-adapter"]
    chunks = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch.get("choices"))
    return 200, text, resp.headers["x-loraloop-adapter"]


def healthy(live: LiveGateway) -> bool:
    try:
        return httpx.get(f"{live.url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_restarted_vllm_gets_its_adapters_back(live_gateway: LiveGateway, label_adapters: Path) -> None:
    live, managed = live_gateway, live_gateway.app.state.managed
    # besides the configured adapter, one registered at runtime and an alias repointed to it
    shutil.copytree(label_adapters / "bravo", label_adapters / "restart-bravo", dirs_exist_ok=True)
    with live.client(key=ADMIN_KEY) as adm:
        reg = adm.post("/admin/adapters", json={"name": "restart-bravo", "path": str(label_adapters / "restart-bravo")})
        assert reg.status_code in (200, 201), reg.text
        assert adm.put("/admin/aliases/ab", json={"adapter": "restart-bravo"}).status_code == 200
    expected = {"labeler": ("alpha", "alpha"), "ab": ("bravo", "restart-bravo")}
    try:
        with live.client() as c:
            for alias, (text, adapter) in expected.items():
                assert ask(c, alias, False) == (200, text, adapter)
            restarts = metric_value(c.get("/metrics").text, "loraloop_backend_restarts_total") or 0.0
        first = psutil.Process(managed.pid)

        first.send_signal(signal.SIGKILL)
        wait_for(lambda: not healthy(live), 30, "the gateway to notice the dead vLLM")
        with live.client() as c:
            down = c.post(
                "/v1/chat/completions", json={"model": "labeler", "messages": [{"role": "user", "content": "x"}]}
            )
        assert down.status_code == 503, down.text

        started = time.monotonic()
        wait_for(lambda: healthy(live), 600, "the restarted vLLM", interval=0.2)
        # the very first requests after /health turned 200 already get the adapters' answers: they were
        # loaded before the back-end took traffic
        with live.client() as c:
            answers = {(alias, stream): ask(c, alias, stream) for alias in expected for stream in (False, True)}
            metrics = c.get("/metrics").text
        print(f"vLLM back after {time.monotonic() - started:.0f} s")
        assert managed.pid != first.pid
        for (alias, stream), got in answers.items():
            assert got == (200, *expected[alias]), (alias, stream, got)
        loaded = {m["id"] for m in httpx.get(f"{vllm_url(live)}/v1/models", timeout=30).json()["data"]}
        assert {"alpha", "restart-bravo"} <= loaded, loaded
        assert metric_value(metrics, "loraloop_backend_restarts_total") == restarts + 1
        assert metric_value(metrics, "loraloop_backend_up") == 1.0
        assert metric_value(metrics, "loraloop_adapters_loaded", backend=vllm_url(live)) == len(loaded - {"base"})
    finally:
        with live.client(key=ADMIN_KEY) as adm:
            adm.put("/admin/aliases/ab", json={"adapter": "alpha"})
            adm.delete("/admin/adapters/restart-bravo")
