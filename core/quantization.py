"""The quantization schemes loraloop offers: what each one is, where vLLM serves it and whether it keeps
adapters working. Data only (no llm-compressor here): the settings validate `quantization:` against it, the
gateway reads a quantized base's provenance with it, and ``retrain/models/quantize.py`` builds each scheme's
llm-compressor recipe. docs/quantization.md has the measurements behind the table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.errors import UsageError

#: Where the scheme can be served (vLLM 0.32; the CPU column was measured on an AVX2 machine).
CPU_AND_GPU = "cpu+gpu"
GPU_ONLY = "gpu only"
CPU_BROKEN_WITH_LORA = "cpu: broken with LoRA"

#: Written into every quantized directory: which scheme made it, from what, with which tools.
PROVENANCE = "loraloop-quantization.json"


class QuantizationRefused(UsageError, ValueError):
    """A request that is refused before any work is done; the message is one line for the operator."""


@dataclass(frozen=True)
class SchemeInfo:
    """One quantization scheme offered by ``loraloop quantize``."""

    name: str
    #: compressed-tensors preset (weights/activations layout) the recipe applies.
    preset: str
    summary: str
    #: CPU_AND_GPU, GPU_ONLY or CPU_BROKEN_WITH_LORA.
    runs: str
    needs_calibration: bool
    #: True when the recipe folds activation scales into the weights (adapters trained on the
    #: unquantized base stop matching).
    rescales_activations: bool
    #: vLLM --dtype that serves it on CPU (None where it does not serve on CPU with LoRA).
    cpu_dtype: str | None = None
    #: The preset's weight group size (grouped presets only); halved down to 32 for models whose layer
    #: widths it does not divide (SmolLM2-135M's 576, say).
    group_size: int | None = None

    @property
    def serves_on_cpu_with_lora(self) -> bool:
        return self.runs == CPU_AND_GPU

    @property
    def keeps_adapters(self) -> bool:
        return not self.rescales_activations


SCHEMES: dict[str, SchemeInfo] = {
    s.name: s
    for s in (
        SchemeInfo(
            "fp8_dynamic",
            "FP8_DYNAMIC",
            "fp8 weights (per channel), fp8 activations (per token, dynamic)",
            CPU_AND_GPU,
            needs_calibration=False,
            rescales_activations=False,
            cpu_dtype="float32",
        ),
        SchemeInfo(
            "w4a8",
            "W4A8",
            "int4 weights (GPTQ, groups of <=128), int8 activations (per token, dynamic)",
            CPU_AND_GPU,
            needs_calibration=True,
            rescales_activations=False,
            cpu_dtype="float32",
            group_size=128,
        ),
        SchemeInfo(
            "w4a16",
            "W4A16",
            "int4 weights (GPTQ, groups of <=128), 16-bit activations",
            GPU_ONLY,
            needs_calibration=True,
            rescales_activations=False,
            group_size=128,
        ),
        SchemeInfo(
            "w4a16_awq",
            "W4A16_ASYM",
            "int4 asymmetric weights (AWQ, groups of <=128), 16-bit activations",
            GPU_ONLY,
            needs_calibration=True,
            rescales_activations=True,
            group_size=128,
        ),
        SchemeInfo(
            "w8a8_int8",
            "W8A8",
            "int8 weights (GPTQ, per channel), int8 activations (per token, dynamic)",
            CPU_BROKEN_WITH_LORA,
            needs_calibration=True,
            rescales_activations=False,
        ),
        SchemeInfo(
            "w8a16",
            "W8A16",
            "int8 weights (GPTQ, per channel), 16-bit activations",
            GPU_ONLY,
            needs_calibration=True,
            rescales_activations=False,
        ),
        SchemeInfo(
            "fp8_static",
            "FP8",
            "fp8 weights (per tensor), fp8 activations (per tensor, static scales)",
            GPU_ONLY,
            needs_calibration=True,
            rescales_activations=False,
        ),
        SchemeInfo(
            "fp8_block",
            "FP8_BLOCK",
            "fp8 weights (128x128 blocks), fp8 activations (dynamic, groups)",
            GPU_ONLY,
            needs_calibration=False,
            rescales_activations=False,
        ),
        SchemeInfo(
            "w8a8_smoothquant",
            "W8A8",
            "SmoothQuant (strength 0.8) then int8 W8A8 with GPTQ",
            CPU_BROKEN_WITH_LORA,
            needs_calibration=True,
            rescales_activations=True,
        ),
    )
}


def get_scheme(scheme: str) -> SchemeInfo:
    """The scheme named ``scheme`` (case-insensitive, ``-`` or ``_``); QuantizationRefused if unknown."""
    key = str(scheme).strip().lower().replace("-", "_")
    if key not in SCHEMES:
        raise QuantizationRefused(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    return SCHEMES[key]


def check_adapter_compatibility(scheme: str | None, adapters_configured: bool, *, device: str | None = None
                                ) -> None:  # fmt: skip
    """Refuse (QuantizationRefused) to serve adapters on a base quantized with ``scheme``, when that breaks
    them: an activation-rescaling scheme with adapters configured, or, with ``device="cpu"``, a scheme that
    vLLM cannot serve on CPU (with LoRA). ``scheme=None`` means an unquantized base: always fine."""
    if scheme is None:
        return
    info = get_scheme(scheme)
    if adapters_configured and info.rescales_activations:
        raise QuantizationRefused(
            f"scheme {info.name!r} rescales activations, so LoRA adapters trained on the unquantized base "
            f"no longer fit it; use fp8_dynamic or w4a8, or retrain the adapters on the quantized base"
        )
    if device == "cpu" and info.runs == GPU_ONLY:
        raise QuantizationRefused(f"scheme {info.name!r} has no CPU kernels in vLLM; serve it on a GPU")
    if device == "cpu" and adapters_configured and info.runs == CPU_BROKEN_WITH_LORA:
        raise QuantizationRefused(
            f"scheme {info.name!r} crashes vLLM's CPU back-end when LoRA is enabled; use fp8_dynamic or w4a8"
        )


def read_scheme(model_dir: Path) -> str | None:
    """The scheme a directory was quantized with by ``quantize`` (None: not made by ``quantize``)."""
    path = Path(model_dir) / PROVENANCE
    if not path.is_file():
        return None
    try:
        scheme = json.loads(path.read_text()).get("scheme")
    except (OSError, ValueError, AttributeError):
        return None
    return scheme if isinstance(scheme, str) else None


__all__ = [
    "CPU_AND_GPU", "CPU_BROKEN_WITH_LORA", "GPU_ONLY", "PROVENANCE", "SCHEMES", "QuantizationRefused", "SchemeInfo",
    "check_adapter_compatibility", "get_scheme", "read_scheme",
]  # fmt: skip
