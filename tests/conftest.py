"""Shared fixtures: the tiny model and ONE real vLLM CPU server (managed by a real gateway) per test
session — vLLM takes about a minute to start here, so every integration test shares it. Also the skip
policy: a skip whose reason is not in EXPECTED_SKIPS fails the session."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from core.settings import Settings
from deploy.local import LocalGateway, start_local_gateway
from tests.adapter_factory import make_label_adapter
from tests.fake_vllm import build_fake_vllm, reset_fake_vllm, serve_in_thread

API_KEY = "sk-live-test-key-42"
ADMIN_KEY = "adm-live-test-key-42"
REPO = Path(__file__).resolve().parent.parent
# the session's vLLM parses tool calls (backends.managed.tool_calling; tests/test_request_log_live.py,
# tests/test_tool_calls_live.py): `pythonic` needs no special tokens, which the tiny model's tokenizer lacks; a named
# tool choice gives schema-constrained arguments. The model's own template stays (the label adapters learnt on it).
TOOL_CALLING = {"parser": "pythonic"}
BASE_ALIASES: dict[str, Any] = {"tiny": {}, "tiny-greedy": {"defaults": {"temperature": 0.0, "max_tokens": 8}}}


# ---------------------------------------------------------------------------------------------- skips
# A skip is a test that did not run, so it must not pass unnoticed: a missing tool, an uninstalled
# dependency or a broken install would otherwise turn into a quiet "s" and a green run. Every skip is
# listed with its reason (`-rfEs` in pyproject's addopts), and the session fails when a test is skipped
# for a reason that does not match this allow-list. Each entry: a regular expression searched in the
# skip's reason -> why that skip is expected (who may see it and why it is not a failure there).
# Empty: .ci/run installs every tool and dependency the suite uses, so no skip is expected anywhere.
EXPECTED_SKIPS: dict[str, str] = {}


class SkipPolicy:
    """The pytest plugin that applies EXPECTED_SKIPS (one instance per session, registered below)."""

    def __init__(self, expected: dict[str, str]) -> None:
        self.expected = expected
        self.unexpected: list[tuple[str, str]] = []

    def _note(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        longrepr = report.longrepr
        # a skip's longrepr is (path, line, "Skipped: reason")
        reason = str(longrepr[2]).removeprefix("Skipped: ") if isinstance(longrepr, tuple) else str(longrepr)
        if not any(re.search(pattern, reason) for pattern in self.expected):
            self.unexpected.append((report.nodeid, reason))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):  # an xfail is reported as skipped too
            self._note(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:  # a whole module skipped (pytest.skip(allow_module_level=True), importorskip)
            self._note(report)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.unexpected and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.unexpected:
            terminalreporter.write_sep("=", f"{len(self.unexpected)} unexpected skip(s): the run fails", red=True)
            for nodeid, reason in self.unexpected:
                terminalreporter.write_line(f"{nodeid}: {reason}")
            terminalreporter.write_line("fix the cause, or allow the reason in tests/conftest.py EXPECTED_SKIPS (why)")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipPolicy(EXPECTED_SKIPS), "loraloop-skip-policy")


# ------------------------------------------------------------------------------------------ fixtures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class FakeBackends:
    """One fake vLLM app behind two loopback servers (two back-end URLs, one shared state)."""

    app: FastAPI
    urls: list[str]


@pytest.fixture(scope="session")
def fake_backends() -> Iterator[FakeBackends]:
    app = build_fake_vllm()
    with serve_in_thread(app) as a, serve_in_thread(app) as b:
        yield FakeBackends(app, [a, b])


@pytest.fixture
def fake_vllm(fake_backends: FakeBackends) -> FakeBackends:
    """The shared fake back-ends, reset for this test."""
    reset_fake_vllm(fake_backends.app)
    return fake_backends


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from retrain.models.prepare import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def adapter_root(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter root holding two valid (untrained, zero-delta) adapters for the tiny base."""
    root = tmp_path_factory.mktemp("adapters")
    for name in ("support-v1", "support-v2"):
        make_label_adapter(tiny_model_dir, root / name, "unused", rank=4, steps=0)
    return root


@pytest.fixture(scope="session")
def label_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter root with two trained adapters: `alpha` and `bravo` answer their own name."""
    root = tmp_path_factory.mktemp("label-adapters")
    for label in ("alpha", "bravo"):
        make_label_adapter(tiny_model_dir, root / label, label, rank=8, steps=60, seed=0)
    return root


class LiveGateway(LocalGateway):
    """A local gateway whose clients carry the test API key by default."""

    def client(self, key: str | None = API_KEY, **kw: Any) -> httpx.Client:
        return super().client(key, **kw)


def start_gateway(settings: Settings, model_path: str | None, *, wait_healthy_s: float = 600) -> LiveGateway:
    g = start_local_gateway(settings, model_path, wait_healthy_s=wait_healthy_s)
    return LiveGateway(g.app, g.settings, g.url, g.server, g.thread)


def live_settings(
    model_dir: Path,
    cache: Path,
    vllm_args: tuple[str, ...] = (),
    tool_calling: dict[str, Any] | None = None,
    **extra: Any,
) -> Settings:
    values: dict[str, Any] = {
        "model": str(model_dir),
        "model_cache_dir": str(cache),
        "port": free_port(),
        "api_key": API_KEY,
        "admin_key": ADMIN_KEY,
        "backends": {
            "mode": "managed",
            "health_interval_s": 1.0,
            "managed": {
                "port": free_port(),
                "max_model_len": 1024,
                "startup_timeout_s": 600,
                "extra_args": list(vllm_args),
                "tool_calling": tool_calling or {},
            },
        },
        "aliases": BASE_ALIASES,
        "store": {"root": str(cache / "events"), "flush_interval_s": 0.02},
        "replica_id": "live",
    }
    values.update(extra)
    return Settings(**values)


@pytest.fixture(scope="session")
def live_gateway(
    tiny_model_dir: Path, label_adapters: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveGateway]:
    cache = tmp_path_factory.mktemp("live-cache")
    settings = live_settings(
        tiny_model_dir,
        cache,
        tool_calling=TOOL_CALLING,
        adapter_root=str(label_adapters),
        state_dir=str(cache / "state"),
        adapters={"alpha": {"path": "alpha"}, "bravo": {"path": "bravo"}},
        aliases={
            **BASE_ALIASES,
            "labeler": {"adapter": "alpha", "defaults": {"temperature": 0.0, "max_tokens": 8}},
            "ab": {"adapter": "alpha", "defaults": {"temperature": 0.0, "max_tokens": 8}},
            "private": {"log_text": False, "defaults": {"max_tokens": 4}},
        },
    )
    live = start_gateway(settings, str(tiny_model_dir))
    yield live
    live.stop()
