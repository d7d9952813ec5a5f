"""`loraloop serve` as a real process: its managed vLLM is restarted after being killed, and shutdown
leaves no vLLM process behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.conftest import API_KEY, free_port

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


def test_restart_after_kill_and_clean_shutdown(tiny_model_dir: Path, tmp_path: Path) -> None:
    port, vllm_port = free_port(), free_port()
    cfg = tmp_path / "loraloop.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir),
        "model_cache_dir": str(tmp_path / "cache"),
        "port": port,
        "backends": {"health_interval_s": 1.0, "managed": {"port": vllm_port, "max_model_len": 512,
                                                            "restart_backoff_s": 0.5}},
        "aliases": {"tiny": {}},
    }))  # fmt: skip
    env = {**os.environ, "LORALOOP_API_KEY": API_KEY}
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

        first[0].send_signal(signal.SIGKILL)
        wait_for(lambda: not healthy(url), 30, "the gateway to notice the dead back-end")
        headers = {"Authorization": f"Bearer {API_KEY}"}
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        down = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert down.status_code == 503 and down.json()["error"]["code"] == "backend_unavailable"

        wait_for(lambda: healthy(url), 600, "the restarted vLLM")
        second = vllm_children(gateway)
        assert len(second) == 1 and second[0].pid != first[0].pid
        family += [second[0], *second[0].children(recursive=True)]
        ok = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert ok.status_code == 200, ok.text
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert f'loraloop_backend_restarts_total{{backend="http://127.0.0.1:{vllm_port}"}} 1.0' in metrics
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
