"""`loraloop serve` as a real process: its managed vLLM, killed, is restarted with its adapters — the gateway
loads every adapter in use (configured or registered at runtime) into the new vLLM before it takes traffic
again (docs/serving.md, "Back-ends"; serving/adapters.py, the join hook) — and shutdown leaves no vLLM process
behind. One process, one restart: a second server for the adapter side would cost another vLLM start."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.conftest import ADMIN_KEY, API_KEY, free_port
from tests.live_helpers import metric_value

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def vllm_children(gateway: psutil.Process) -> list[psutil.Process]:
    return [p for p in gateway.children(recursive=True) if "vllm.entrypoints" in " ".join(p.cmdline())]


def ask(url: str, alias: str, stream: bool) -> tuple[int, str, str]:
    """(status, answer, x-loraloop-adapter) of one greedy chat request."""
    body = {"model": alias, "messages": [{"role": "user", "content": "Label this."}], "stream": stream,
            "temperature": 0.0, "max_tokens": 8}  # fmt: skip
    resp = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60)  # fmt: skip
    if resp.status_code != 200:
        return resp.status_code, resp.text, ""
    if not stream:
        return 200, resp.json()["choices"][0]["message"]["content"], resp.headers["x-loraloop-adapter"]
    chunks = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch.get("choices"))
    return 200, text, resp.headers["x-loraloop-adapter"]


def test_restart_after_kill_with_adapters_and_clean_shutdown(
    tiny_model_dir: Path, label_adapters: Path, tmp_path: Path
) -> None:
    port, vllm_port = free_port(), free_port()
    root = tmp_path / "adapters"
    shutil.copytree(label_adapters / "alpha", root / "alpha")
    shutil.copytree(label_adapters / "bravo", root / "restart-bravo")
    cfg = tmp_path / "loraloop.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir),
        "model_cache_dir": str(tmp_path / "cache"),
        "adapter_root": str(root),
        "state_dir": str(tmp_path / "state"),
        "port": port,
        "backends": {"health_interval_s": 1.0, "managed": {"port": vllm_port, "max_model_len": 512,
                                                            "restart_backoff_s": 0.5}},
        "adapters": {"alpha": {"path": "alpha"}},
        "aliases": {"tiny": {}, "labeler": {"adapter": "alpha"}, "ab": {"adapter": "alpha"}},
    }))  # fmt: skip
    env = {**os.environ, "LORALOOP_API_KEY": API_KEY, "LORALOOP_ADMIN_KEY": ADMIN_KEY}
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "--config", str(cfg), "serve"], env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    gateway = psutil.Process(proc.pid)
    family: list[psutil.Process] = []
    try:
        wait_for(lambda: healthy(url), 600, "the first start of vLLM")
        first = vllm_children(gateway)
        assert len(first) == 1
        family += [first[0], *first[0].children(recursive=True)]
        # besides the configured adapter, one registered at runtime and an alias repointed to it
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        reg = httpx.post(f"{url}/admin/adapters", json={"name": "restart-bravo", "path": "restart-bravo"},
                         headers=admin, timeout=120)  # fmt: skip
        assert reg.status_code in (200, 201), reg.text
        point = httpx.put(f"{url}/admin/aliases/ab", json={"adapter": "restart-bravo"}, headers=admin, timeout=60)
        assert point.status_code == 200, point.text
        expected = {"labeler": ("alpha", "alpha"), "ab": ("bravo", "restart-bravo")}
        for alias, (text, adapter) in expected.items():
            assert ask(url, alias, False) == (200, text, adapter)

        first[0].send_signal(signal.SIGKILL)
        wait_for(lambda: not healthy(url), 30, "the gateway to notice the dead back-end")
        down = ask(url, "tiny", False)
        assert down[0] == 503 and json.loads(down[1])["error"]["code"] == "backend_unavailable", down

        wait_for(lambda: healthy(url), 600, "the restarted vLLM")
        # the very first requests after /health turned 200 already get the adapters' answers: they were
        # loaded before the back-end took traffic
        answers = {(alias, stream): ask(url, alias, stream) for alias in expected for stream in (False, True)}
        second = vllm_children(gateway)
        assert len(second) == 1 and second[0].pid != first[0].pid
        family += [second[0], *second[0].children(recursive=True)]
        for (alias, stream), got in answers.items():
            assert got == (200, *expected[alias]), (alias, stream, got)
        assert ask(url, "tiny", False)[0] == 200
        loaded = {m["id"] for m in httpx.get(f"http://127.0.0.1:{vllm_port}/v1/models", timeout=30).json()["data"]}
        assert {"alpha", "restart-bravo"} <= loaded, loaded
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        backend = f"http://127.0.0.1:{vllm_port}"
        assert metric_value(metrics, "loraloop_backend_restarts_total", backend=backend) == 1.0
        assert metric_value(metrics, "loraloop_backend_up", backend=backend) == 1.0
        assert metric_value(metrics, "loraloop_adapters_loaded", backend=backend) == len(loaded - {"base"})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught: -15 is a clean exit
    assert proc.returncode in (0, -signal.SIGTERM), (tmp_path / "serve.log").read_text()[-3000:]
    assert "managed vLLM stopped" in (tmp_path / "serve.log").read_text()

    def alive() -> list[int]:
        pids = []
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):  # gone between the two questions: not alive
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    pids.append(p.pid)
        return pids

    # the gateway has exited; processes it killed may still be exiting on a loaded machine: wait for that
    # (a process left behind stays, and fails this after the deadline) instead of a fixed second
    deadline = time.monotonic() + 30
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive() == [], f"vLLM processes left behind: {alive()}"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{vllm_port}/health", timeout=2)
