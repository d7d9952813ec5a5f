"""A vLLM OpenAI server run as a child of the gateway: started, watched, restarted when it dies,
and stopped — with all of its children — on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import httpx
import psutil

from core.serving_config import ManagedBackendConfig, ToolCallingConfig

from .backends import Backend, BackendPool
from .metrics import GatewayMetrics

logger = logging.getLogger(__name__)


def detect_device(requested: str) -> str:
    if requested != "auto":
        return requested
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def vllm_command(
    model: str, served_name: str, cfg: ManagedBackendConfig, device: str, max_lora_rank: int = 16
) -> list[str]:
    """The vLLM OpenAI server command line for this machine (`python -m`, since the console
    script of the CPU build fails on its package metadata)."""
    cpu = device == "cpu"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--served-model-name", served_name,
        "--host", cfg.host,
        "--port", str(cfg.port),
        "--dtype", cfg.dtype or ("float32" if cpu else "auto"),
        "--gpu-memory-utilization", str(cfg.gpu_memory_utilization or (0.3 if cpu else 0.9)),
        "--enable-lora",
        "--max-lora-rank", str(max_lora_rank),
        "--max-loras", str(cfg.max_loras),
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if cfg.max_model_len:
        cmd += ["--max-model-len", str(cfg.max_model_len)]
    return cmd + tool_calling_args(cfg.tool_calling) + list(cfg.extra_args)


#: where the chat templates shipped with the gateway live (`tool_calling.chat_template` names them)
TEMPLATES = Path(__file__).resolve().parent / "templates"


def chat_template_path(value: str) -> Path:
    """The Jinja file of a `tool_calling.chat_template`: a shipped template by name, else the path given."""
    shipped = TEMPLATES / f"{value.replace('-', '_')}.jinja"
    return shipped if "/" not in value and shipped.is_file() else Path(value).expanduser().resolve()


def tool_calling_args(cfg: ToolCallingConfig) -> list[str]:
    """vLLM's tool-calling flags: auto tool choice with the parser (needed for `tools` with `auto`, and
    for a named or `required` tool choice), and the chat template that shows the model its tools."""
    if cfg.parser is None:
        return []
    args = ["--enable-auto-tool-choice", "--tool-call-parser", cfg.parser]
    if cfg.chat_template is not None:
        args += ["--chat-template", str(chat_template_path(cfg.chat_template))]
    if cfg.compact_json:  # vLLM takes the flag only with a backend named: xgrammar, what "auto" picks first
        args += ["--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
    return args


def vllm_env(cfg: ManagedBackendConfig, device: str, keepalive_s: float = 4.0) -> dict[str, str]:
    env = dict(os.environ)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    # the server keeps idle connections longer than the gateway does, so the gateway never reuses one
    # the server is just closing
    env.setdefault("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", str(math.ceil(keepalive_s) + 5))
    if device == "cpu":
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kvcache_gib))
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux only)
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ManagedVLLM:
    """Runs one vLLM server process and keeps the matching pool entry honest about it."""

    def __init__(
        self,
        model: str,
        served_name: str,
        cfg: ManagedBackendConfig,
        pool: BackendPool,
        metrics: GatewayMetrics,
        log_dir: Path,
        max_lora_rank: int = 16,
        keepalive_s: float = 4.0,
    ) -> None:
        self.cfg = cfg
        self.device = detect_device(cfg.device)
        self.command = vllm_command(model, served_name, cfg, self.device, max_lora_rank)
        self.env = vllm_env(cfg, self.device, keepalive_s)
        self.pool = pool
        self.metrics = metrics
        self.url = f"http://{cfg.host}:{cfg.port}"
        self.backend: Backend = next(b for b in pool.backends if b.url == self.url)
        self.log_path = log_dir / f"vllm-{cfg.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.command)}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            self.command,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() takes every child with it
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        log.close()
        logger.info("started vLLM (pid %s) on %s; log: %s", self.proc.pid, self.url, self.log_path)

    def _log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as f:
                tail = deque(f, maxlen=lines)
            return b"".join(tail).decode(errors="replace")
        except OSError:
            return ""

    async def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                resp = await self.pool.client.get(f"{self.url}/health", timeout=2.0)
                if resp.status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
        return False

    async def _run(self) -> None:
        while not self._stopping:
            self.backend.starting = True
            self._spawn()
            healthy = await self._wait_healthy()
            self.backend.starting = False
            if healthy:
                await self.pool.check(self.backend)  # runs the join hooks, then takes traffic
            elif not self._stopping:
                logger.error("vLLM did not become healthy; last log lines:\n%s", self._log_tail())
                await self._terminate()
            # watch the process until it exits
            while not self._stopping and self.proc is not None and self.proc.poll() is None:
                await asyncio.sleep(0.5)
            if self._stopping:
                return
            code = self.proc.returncode if self.proc else None
            self.pool.mark_down(self.backend, f"managed vLLM exited with code {code}")
            logger.error(
                "managed vLLM (pid %s) died with exit code %s; restarting in %.1fs. Last log lines:\n%s",
                self.pid, code, self.cfg.restart_backoff_s, self._log_tail(),
            )  # fmt: skip
            self.restarts += 1
            self.metrics.backend_restarts.labels(self.url).inc()
            await self._terminate()  # reap leftovers of the dead process group
            await asyncio.sleep(self.cfg.restart_backoff_s)

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="managed-vllm")

    async def _terminate(self) -> None:
        """SIGTERM the process group, wait, then SIGKILL whatever is left (children included)."""
        proc = self.proc
        if proc is None:
            return
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.Error:
            family = []
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.stop_timeout_s
        while time.monotonic() < deadline and any(_alive(p) for p in family):
            await asyncio.sleep(0.2)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._terminate()
        self.pool.mark_down(self.backend, "stopped")
        logger.info("managed vLLM stopped")


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
