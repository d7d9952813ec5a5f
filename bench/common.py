"""What the benchmarks share: keys, free ports, and a `loraloop serve` process to measure against (a
separate process, so the load generator does not share the gateway's event loop).

Every bench script runs both as `python bench/X.py` and as `python -m bench.X`. Run as a file, Python puts
bench/ (not the repository) first on sys.path, so each script that imports `bench.*`, `tests.*` or the
loop's packages inserts the repository root itself (an editable install may predate a package, and
never holds bench/ or tests/), and no bench module is named like an importable package (a test checks
both)."""

from __future__ import annotations

import argparse
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
import psutil
import yaml

KEY = "sk-bench-key-0001"
ADMIN = "adm-bench-key-0001"
REPO = Path(__file__).resolve().parent.parent


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


def add_vllm_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vllm-url", help="measure against this running vLLM server (served name `base`, "
                        "--enable-lora) instead of starting one")  # fmt: skip


def backends(vllm_url: str | None, **managed: Any) -> dict[str, Any]:
    """The gateway's `backends` settings: the given vLLM server, or a managed one with these settings."""
    if vllm_url:
        return {"mode": "remote", "urls": [vllm_url], "health_interval_s": 1.0}
    return {"health_interval_s": 1.0, "managed": {"port": free_port(), **managed}}


def add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", help="the gateway's base model directory (default: build the "
                        "tiny preset, which imports torch and transformers: seconds of start-up)")  # fmt: skip


def model_dir(model: str | None, tmp: Path) -> str:
    """`model` as an absolute path, or the tiny preset built under `tmp`."""
    if model:
        return str(Path(model).absolute())
    from retrain.models.prepare import build_tiny

    return str(build_tiny(tmp / "tiny"))


def pid_listening_on(url: str) -> int:
    """The pid of the process listening on the URL's port."""
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return int(conn.pid)
    raise SystemExit(f"no process listens on port {port}")


@contextmanager
def gateway_process(settings: dict[str, Any], workdir: Path, name: str = "gateway") -> Iterator[str]:
    """`loraloop serve` with these settings (YAML) in a child process; yields its URL once healthy and
    stops it (and its managed vLLM) on exit."""
    with gateway_processes({name: settings}, workdir) as urls:
        yield urls[name]


@contextmanager
def gateway_processes(settings: dict[str, dict[str, Any]], workdir: Path) -> Iterator[dict[str, str]]:
    """Several gateways (name -> settings), started together: a start is seconds of imports each, waited for
    one after another they add up. Yields name -> URL once all are healthy; stops them all on exit."""
    env = {**os.environ, "LORALOOP_API_KEY": KEY, "LORALOOP_ADMIN_KEY": ADMIN}
    # this checkout's packages, from any working directory and whatever the installed copy holds
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    started: dict[str, tuple[subprocess.Popen[bytes], str, Path]] = {}
    try:
        for name, values in settings.items():
            values = {"port": free_port(), "log_level": "warning", **values}
            cfg, log = workdir / f"{name}.yaml", workdir / f"{name}.log"
            cfg.write_text(yaml.safe_dump(values))
            with log.open("wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "--config", str(cfg), "serve"],
                                        env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
            started[name] = (proc, f"http://127.0.0.1:{values['port']}", log)
        for name, (proc, url, log) in started.items():
            wait_healthy(url, proc, name, log)
        yield {name: url for name, (_, url, _) in started.items()}
    finally:
        for proc, _, _ in started.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _, _ in started.values():
            proc.wait(timeout=120)
