"""What the benchmarks share: keys, free ports, and a `loraloop serve` process to measure against (a
separate process, so the load generator does not share the gateway's event loop)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

KEY = "sk-bench-key-0001"
ADMIN = "adm-bench-key-0001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], what: str, log: Path | None = None) -> None:
    for _ in range(900):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(1)
    tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
    raise SystemExit(f"{what} did not start\n{tail}")


@contextmanager
def gateway_process(settings: dict[str, Any], workdir: Path, name: str = "gateway") -> Iterator[str]:
    """`loraloop serve` with these settings (YAML) in a child process; yields its URL once healthy and
    stops it (and its managed vLLM) on exit."""
    settings = {"port": free_port(), "log_level": "warning", **settings}
    cfg, log = workdir / f"{name}.yaml", workdir / f"{name}.log"
    cfg.write_text(yaml.safe_dump(settings))
    env = {**os.environ, "LORALOOP_API_KEY": KEY, "LORALOOP_ADMIN_KEY": ADMIN}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "--config", str(cfg), "serve"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{settings['port']}"
    try:
        wait_healthy(url, proc, name, log)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
