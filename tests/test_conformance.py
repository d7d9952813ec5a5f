"""Schemathesis against the live gateway with OpenAI's spec (filtered to our endpoints, models pinned
to what is served): no server error and no schema violation, for JSON responses and SSE chunks. The spec
is vendored in tests/data/conformance (its README says where it comes from)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import API_KEY, LiveGateway

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parent / "data" / "conformance"
SPEC = DATA / "openai-openapi-filtered.yaml"
FILTER = DATA / "filter_spec.py"


def pinned_spec(out: Path, models: str, force_stream: bool) -> Path:
    env = {**os.environ, "PIN_MODELS": models, "FORCE_STREAM": "1" if force_stream else "0"}
    proc = subprocess.run([sys.executable, str(FILTER), str(SPEC), str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("force_stream", [False, True], ids=["json", "sse"])
def test_schemathesis_finds_nothing(live_gateway: LiveGateway, tmp_path: Path, force_stream: bool) -> None:
    spec = pinned_spec(tmp_path / "spec.yaml", ",".join(live_gateway.settings.aliases), force_stream)
    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    cmd = [
        exe, "run", str(spec),
        "--url", f"{live_gateway.url}/v1",
        "-H", f"Authorization: Bearer {API_KEY}",
        "--checks", "not_a_server_error,response_schema_conformance",
        "--max-examples", os.environ.get("LORALOOP_SCHEMATHESIS_EXAMPLES", "20"),
        "--request-timeout", "60",
        "--seed", "20261129",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    summary = run.stdout[-6000:]
    assert run.returncode == 0, summary
    assert " passed" in summary and "generated" in summary
