"""`loraloop quantize SRC DST --scheme w4a8`: GPTQ calibrated on the built-in calibration text, int4 weights in
groups, written as a compressed-tensors checkpoint that transformers loads, and on which a LoRA adapter trained
on the unquantized base still gives its answers (docs/quantization.md: 16/16 `alpha` for w4a8). The FP8
counterpart is tests/test_quantize.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from core.quantization import PROVENANCE, read_scheme
from deploy.cli import main
from retrain.models.quantize import llmcompressor_available
from tests import adapter_factory as af

pytestmark = pytest.mark.integration  # llm-compressor in a worker process, GPTQ on real calibration data
# llm-compressor is part of the install (scripts/install.sh): its absence is a failure, not a skip
assert llmcompressor_available(), "llm-compressor is not installed (scripts/install.sh, docs/quantization.md)"
SAMPLES = 16  # calibration samples: few, to keep the run short; the provenance must say so


@pytest.fixture(scope="module")
def w4a8_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("quantized") / "tiny-w4a8"
    code = main(["quantize", str(tiny_model_dir), str(dst), "--scheme", "w4a8", "--samples", str(SAMPLES), "--seed",
                 "3"])  # fmt: skip
    assert code == 0
    return dst


def test_w4a8_checkpoint_is_gptq_calibrated_int4(w4a8_dir: Path, tiny_model_dir: Path) -> None:
    import torch

    qc = json.loads((w4a8_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["ignore"] == ["lm_head"]  # the LM head is never quantized
    (group,) = qc["config_groups"].values()
    w, a = group["weights"], group["input_activations"]
    # int4 weights in groups of 128 input columns (128 divides every width of the tiny model: 128 and 384)
    assert (w["type"], w["num_bits"], w["strategy"], w["group_size"]) == ("int", 4, "group", 128), w
    assert (a["type"], a["num_bits"], a["strategy"], a["dynamic"]) == ("int", 8, "token", True), a
    assert read_scheme(w4a8_dir) == "w4a8"
    provenance = json.loads((w4a8_dir / PROVENANCE).read_text())
    assert provenance["scheme"] == "w4a8" and provenance["group_size"] == w["group_size"]
    assert provenance["calibration_samples"] == SAMPLES and provenance["seed"] == 3
    assert provenance["calibration_data"] == "retrain.models.quantize.calibration_texts"
    assert provenance["cpu_dtype"] == "float32" and provenance["source"] == str(tiny_model_dir)
    assert provenance["llmcompressor"] and provenance["compressed_tensors"]
    # calibrated: the recipe llm-compressor ran was GPTQ (not plain round-to-nearest)
    recipe = yaml.safe_load((w4a8_dir / "recipe.yaml").read_text())
    assert "GPTQModifier" in json.dumps(recipe), recipe
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # copied verbatim
        assert (w4a8_dir / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    # the tensors themselves: every decoder Linear holds int4 values (int8 storage, -8..7) with one scale per
    # output row and 128-column group; the embeddings and the LM head stay float32
    from safetensors.torch import load_file

    tensors = {k: v for f in w4a8_dir.glob("*.safetensors") for k, v in load_file(f).items()}
    linears = [k.removesuffix(".weight") for k in tensors if k.endswith("_proj.weight")]
    assert len(linears) == 2 * 7, linears  # 2 layers x q, k, v, o, gate, up, down
    for name in linears:
        weight, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
        assert weight.dtype == torch.int8 and int(weight.min()) >= -8 and int(weight.max()) <= 7, name
        assert tuple(scale.shape) == (weight.shape[0], weight.shape[1] // w["group_size"]), (name, scale.shape)
    assert tensors["lm_head.weight"].dtype == tensors["model.embed_tokens.weight"].dtype == torch.float32
    assert sorted(p.name for p in w4a8_dir.parent.iterdir()) == [w4a8_dir.name]  # no temp dir or log left


def test_transformers_loads_w4a8_and_adapter_still_answers(
    w4a8_dir: Path, tiny_model_dir: Path, label_adapters: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[0, 3, 17, 250, 999, 42, 7]])
    with torch.no_grad():
        quantized = AutoModelForCausalLM.from_pretrained(w4a8_dir).eval()(ids).logits
        reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()(ids).logits
    assert quantized.shape == reference.shape and torch.isfinite(quantized).all()
    assert not torch.equal(quantized, reference)  # really rounded
    # int4 with 128-wide groups: coarser than fp8, still far inside the logits' own range
    assert (quantized - reference).abs().max() < 0.5 * reference.abs().max()
    # the adapter trained on the float32 base keeps its answer on the int4 base (weight-only rounding keeps
    # the layers' input and output spaces)
    expected = af.greedy_answers(tiny_model_dir, label_adapters / "alpha", af.EVAL_PROMPTS, max_new_tokens=4)
    answers = af.greedy_answers(w4a8_dir, label_adapters / "alpha", af.EVAL_PROMPTS, max_new_tokens=4)
    assert answers == expected and {a.removesuffix("<|im_end|>") for a in answers} == {"alpha"}, answers
