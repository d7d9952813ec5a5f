"""Base-model requests batched next to LoRA requests get the base's answers, even after every adapter slot of
the CPU vLLM has held an adapter (serving/vllm_cpu_lora_fix.py: vLLM's CPU ops gave them the last slot's
adapter, vllm#48421; the demo's canary then scored its base arm like the candidate and never promoted).

The live test fills the slots of the session's vLLM the way weeks of production do (more adapters used than
--max-loras, then unloaded), then sends base and adapter requests at once, and compares every base answer
with the base's answer to the same prompt before any adapter was used."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from serving.vllm_cpu_lora_fix import OPS, skipping_no_lora_tokens
from tests.adapter_factory import EVAL_PROMPTS
from tests.conftest import LiveGateway
from tests.live_helpers import vllm_url


def test_the_wrapped_ops_leave_no_lora_rows_untouched_and_others_as_vllm_computes_them() -> None:
    from vllm.lora.ops.torch_ops import lora_ops

    originals = {op: getattr(lora_ops, op) for op in OPS}
    for op in OPS:
        assert not getattr(originals[op], "__loraloop_fix__", False), "the test process must see vLLM's own ops"
    weights = torch.stack([torch.full((4, 3), 1.0), torch.full((4, 3), 2.0)])  # two slots, out 4 x in 3
    inputs, indices = torch.ones(3, 3), torch.tensor([0, -1, 1])
    fixed, plain = torch.full((3, 4), 7.0), torch.full((3, 4), 7.0)
    skipping_no_lora_tokens(originals["bgmv_expand"])(inputs, weights, fixed, indices, True)
    originals["bgmv_expand"](inputs, weights, plain, indices, True)
    assert fixed[1].tolist() == [7.0] * 4  # the base token: no delta
    assert plain[1].tolist() == [13.0] * 4  # vLLM's own op: the last slot's delta (2 x 3 added), the bug
    assert fixed[[0, 2]].tolist() == plain[[0, 2]].tolist() == [[10.0] * 4, [13.0] * 4]  # adapter tokens as vLLM
    shrunk = torch.full((3, 4), 5.0)
    skipping_no_lora_tokens(originals["bgmv_shrink"])(inputs, weights, shrunk, torch.tensor([-1, -1, -1]), 1.0)
    assert shrunk.tolist() == [[5.0] * 4] * 3  # only base tokens: nothing written, as the GPU kernels do


@pytest.mark.integration
def test_base_answers_stay_the_base_s_after_every_slot_held_an_adapter(
    live_gateway: LiveGateway, label_adapters: Path, tmp_path: Path
) -> None:
    url = vllm_url(live_gateway)
    base_name = live_gateway.settings.backends.served_model_name
    slots = live_gateway.settings.backends.managed.max_loras
    client = httpx.Client(base_url=url, timeout=120)

    def ask(model: str, prompt: str) -> str:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0}
        resp = client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        return str(resp.json()["choices"][0]["message"]["content"])

    before = {p: ask(base_name, p) for p in EVAL_PROMPTS}
    assert not any("bravo" in a or "alpha" in a for a in before.values()), before
    fillers = [f"slot-filler-{i}" for i in range(slots + 2)]
    try:
        for name in fillers:  # each one used, so each takes a slot; more than there are slots
            shutil.copytree(label_adapters / "bravo", tmp_path / name)
            load = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(tmp_path / name)})
            assert load.status_code == 200, load.text
            assert ask(name, EVAL_PROMPTS[0]).startswith("bravo")
    finally:
        for name in fillers:
            client.post("/v1/unload_lora_adapter", json={"lora_name": name})
    jobs = [(base_name if i % 2 else "alpha", EVAL_PROMPTS[i % len(EVAL_PROMPTS)]) for i in range(48)]
    with ThreadPoolExecutor(8) as pool:  # base and adapter requests in the same batches
        answers = list(pool.map(lambda job: (job, ask(*job)), jobs))
    wrong = [(prompt, got) for (model, prompt), got in answers if model == base_name and got != before[prompt]]
    assert wrong == [], f"{len(wrong)} of 24 base answers changed: {wrong[:4]}"
    assert all(got.startswith("alpha") for (model, _), got in answers if model == "alpha")
