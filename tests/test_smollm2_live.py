"""The embedded default: the smollm2 preset is prepared without a hub and answers a chat request.

Marked `smollm2` (not in the default run: about 90 s for one vLLM start on SmolLM2): the default run covers the
same path in tests/test_demo_default.py, which prepares the preset, serves it on a managed vLLM and checks that
its answers are SmolLM2's. Run it with `pytest -m smollm2 tests/test_smollm2_live.py`."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrain.models.prepare import prepare_model
from tests.conftest import live_settings, start_gateway

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.smollm2]


def test_smollm2_preset_serves_real_answers(tmp_path: Path) -> None:
    model_dir = prepare_model("smollm2", tmp_path / "models")  # must work offline: the PyPI wheel route
    settings = live_settings(Path(model_dir), tmp_path, aliases={"assistant": {"defaults": {"temperature": 0.0}}})
    live = start_gateway(settings, model_dir)
    try:
        with live.client() as c:
            resp = c.post("/v1/chat/completions", json={
                "model": "assistant", "max_tokens": 16,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
            })  # fmt: skip
        assert resp.status_code == 200, resp.text
        assert "Paris" in resp.json()["choices"][0]["message"]["content"]
    finally:
        live.stop()
