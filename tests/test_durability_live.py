"""kill -9 of a real gateway process under load: every feedback acknowledged with 2xx and every request
whose response the client received is in the store afterwards (a restarted gateway on the same store
recovers and seals what the dead one left)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from feedback.reader import StoreReader
from tests.conftest import API_KEY, LiveGateway, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def start(cfg: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = yaml.safe_load(cfg.read_text())["port"]
    env = {**os.environ, "LORALOOP_API_KEY": API_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "--config", str(cfg), "serve"], env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # a deadline, not a count of tries: start-up is slow on a loaded machine
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(log.read_text()[-3000:])


def test_kill_9_loses_nothing_acknowledged(live_gateway: LiveGateway, tiny_model_dir: Path, tmp_path: Path) -> None:
    vllm = f"http://127.0.0.1:{live_gateway.settings.backends.managed.port}"
    root = tmp_path / "events"
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "port": free_port(), "replica_id": "crashy", "log_level": "warning",
        "state_dir": str(tmp_path / "state"), "store": {"root": str(root)},
        "backends": {"mode": "remote", "urls": [vllm], "health_interval_s": 1.0},
        "aliases": {"tiny": {"defaults": {"max_tokens": 3}}},
    }))  # fmt: skip
    proc, url = start(cfg, tmp_path / "gw.log")
    served: list[str] = []
    acked: list[str] = []
    lock, stop = threading.Lock(), threading.Event()

    def worker(w: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as c:
            n = 0
            while not stop.is_set():
                n += 1
                body = {"model": "tiny", "messages": [{"role": "user", "content": f"hi {w} {n}"}],
                        "stream": n % 2 == 0}  # fmt: skip
                try:
                    resp = c.post("/v1/chat/completions", json=body)
                    if resp.status_code != 200 or (body["stream"] and "[DONE]" not in resp.text):
                        continue
                    rid = resp.headers["x-request-id"]
                    with lock:
                        served.append(rid)
                    fid = f"fb-{w}-{n}"
                    fb = c.post("/v1/feedback", json={"request_id": rid, "kind": "thumbs", "value": True,
                                                      "feedback_id": fid})  # fmt: skip
                    if fb.status_code in (200, 201):
                        with lock:
                            acked.append(fid)
                except httpx.HTTPError:
                    time.sleep(0.05)

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(4)]
    for t in threads:
        t.start()
    # enough traffic first (a condition: a loaded machine serves fewer requests per second), then a little
    # more, so the kill lands at an arbitrary moment mid-traffic
    deadline = time.monotonic() + 300
    while True:
        with lock:
            enough = len(served) >= 10 and len(acked) >= 10
        if enough:
            break
        assert time.monotonic() < deadline, (len(served), len(acked))
        time.sleep(0.1)
    time.sleep(random.uniform(0.0, 3.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert len(served) >= 10 and len(acked) >= 10, (len(served), len(acked))

    con = StoreReader(root).connect()  # readers see the dead writer's WAL without any recovery
    have_fb = {r[0] for r in con.execute("SELECT feedback_id FROM feedback").fetchall()}
    have_req = {r[0] for r in con.execute("SELECT request_id FROM requests").fetchall()}
    assert set(acked) <= have_fb, sorted(set(acked) - have_fb)[:5]
    assert set(served) <= have_req, sorted(set(served) - have_req)[:5]
    con.close()

    proc2, _ = start(cfg, tmp_path / "gw2.log")  # same replica id: recovers and seals the WAL
    proc2.send_signal(signal.SIGTERM)
    proc2.wait(timeout=60)
    con = StoreReader(root).connect()
    rows = con.execute("SELECT count(*), count(DISTINCT feedback_id) FROM feedback").fetchone()
    assert rows is not None and rows[0] == rows[1] >= len(acked)  # deduplicated, nothing lost
    have_req = {r[0] for r in con.execute("SELECT request_id FROM requests").fetchall()}
    assert set(served) <= have_req
    assert list((root / "crashy").glob("feedback-*.parquet"))  # the restarted writer sealed the dead one's WAL
