"""retrain.models.quantize and core.quantization: the scheme table and adapter policy, llm-compressor
FP8_DYNAMIC on the tiny model (compressed-tensors checkpoint that transformers loads), the CLI, and — the real
check — vLLM CPU serving the FP8 base with a LoRA adapter the way transformers+peft serves the unquantized
base."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.quantization import (
    CPU_AND_GPU,
    PROVENANCE,
    SCHEMES,
    QuantizationRefused,
    check_adapter_compatibility,
    get_scheme,
    read_scheme,
)
from deploy.cli import main
from retrain.models.quantize import (
    PATH_ENV,
    QuantizationFailed,
    calibration_texts,
    fit_group_size,
    install_hint,
    llmcompressor_available,
    quantize,
)
from tests.conftest import REPO

# scripts/install.sh installs llm-compressor (into .venv/llmcompressor) on every install, so its absence
# is a broken install: the tests that need it fail, with the command that installs it.
NO_LLMCOMPRESSOR = f"llm-compressor is not installed (scripts/install.sh installs it): {install_hint()}"
RESCALING = sorted(name for name, info in SCHEMES.items() if info.rescales_activations)
KEEPING = sorted(name for name, info in SCHEMES.items() if not info.rescales_activations)


def run_cli(argv: list[str]) -> int:
    """`loraloop quantize ...` in this process, through the CLI's main (its errors and exit codes)."""
    return main(argv)


@pytest.fixture(scope="module")
def fp8_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model quantized with FP8_DYNAMIC, made through the CLI handler."""
    assert llmcompressor_available(), NO_LLMCOMPRESSOR
    dst = tmp_path_factory.mktemp("quantized") / "tiny-fp8"
    assert run_cli(["quantize", str(tiny_model_dir), str(dst), "--scheme", "fp8_dynamic"]) == 0
    return dst


# ------------------------------------------------------------------------------------ policy, fast


def test_scheme_table() -> None:
    assert {"fp8_dynamic", "w4a8", "w4a16", "w4a16_awq", "w8a8_int8", "w8a16", "fp8_static", "fp8_block",
            "w8a8_smoothquant"} <= set(SCHEMES)  # fmt: skip
    assert RESCALING == ["w4a16_awq", "w8a8_smoothquant"]
    assert sorted(n for n, s in SCHEMES.items() if s.runs == CPU_AND_GPU) == ["fp8_dynamic", "w4a8"]
    assert not SCHEMES["fp8_dynamic"].needs_calibration and SCHEMES["w4a8"].needs_calibration
    assert get_scheme("FP8-Dynamic") is SCHEMES["fp8_dynamic"]


@pytest.mark.parametrize("scheme", RESCALING)
def test_activation_rescaling_scheme_refused_with_adapters(scheme: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizationRefused, match="rescales activations") as err:
        check_adapter_compatibility(scheme, adapters_configured=True)
    assert "\n" not in str(err.value)
    check_adapter_compatibility(scheme, adapters_configured=False)  # a base without adapters is fine
    with pytest.raises(QuantizationRefused, match=r"allow_adapter_breaking=True \(CLI --force\)"):
        quantize(tiny_model_dir, tmp_path / "out", scheme)
    assert list(tmp_path.iterdir()) == []  # refused before any work: nothing written, not even a temp dir


@pytest.mark.parametrize("scheme", KEEPING)
def test_adapter_keeping_schemes_pass(scheme: str) -> None:
    check_adapter_compatibility(scheme, adapters_configured=True)
    check_adapter_compatibility(None, adapters_configured=True)


def test_cpu_refusals() -> None:
    check_adapter_compatibility("fp8_dynamic", True, device="cpu")
    with pytest.raises(QuantizationRefused, match="no CPU kernels"):
        check_adapter_compatibility("w4a16", False, device="cpu")
    with pytest.raises(QuantizationRefused, match="crashes vLLM's CPU back-end when LoRA is enabled"):
        check_adapter_compatibility("w8a8_int8", True, device="cpu")
    check_adapter_compatibility("w8a8_int8", False, device="cpu")


def test_unknown_scheme(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for call in (lambda: get_scheme("int3"), lambda: check_adapter_compatibility("int3", False),
                 lambda: quantize(tiny_model_dir, tmp_path / "out", "int3")):  # fmt: skip
        with pytest.raises(QuantizationRefused, match=r"unknown quantization scheme 'int3'; known: fp8_dynamic, "):
            call()
    assert run_cli(["quantize", str(tiny_model_dir), str(tmp_path / "out"), "--scheme", "int3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loraloop: error: unknown quantization scheme 'int3'") and err.count("\n") == 1


def test_bad_inputs_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizationRefused, match="not a model directory"):
        quantize(tmp_path, tmp_path / "out", "fp8_dynamic")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(QuantizationRefused, match="is not empty; pass overwrite=True"):
        quantize(tiny_model_dir, busy, "fp8_dynamic")
    with pytest.raises(QuantizationRefused, match="must not be the source"):
        quantize(tiny_model_dir, tiny_model_dir / "q", "fp8_dynamic")
    with pytest.raises(QuantizationRefused, match="calibration_samples must be"):
        quantize(tiny_model_dir, tmp_path / "out", "w4a8", calibration_samples=0)


def test_missing_llmcompressor_is_one_clear_line(tiny_model_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # llm-compressor absent from both places quantize() looks: its extra path and the main environment
    # (where install.sh does not put it, but a user's pip may have)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llmcompressor" else find_spec(name, *a)
    )
    monkeypatch.setenv(PATH_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(QuantizationFailed, match="llm-compressor is not installed; install it with: pip install"):
        quantize(tiny_model_dir, tmp_path / "out", "fp8_dynamic")


def test_worker_failure_is_one_line_and_leaves_no_model(tiny_model_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    fake = tmp_path / "site" / "llmcompressor"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('broken llm-compressor for the test')\n")
    monkeypatch.setenv(PATH_ENV, str(tmp_path / "site"))
    out = tmp_path / "models" / "out"
    with pytest.raises(QuantizationFailed, match="ImportError: broken llm-compressor for the test") as err:
        quantize(tiny_model_dir, out, "fp8_dynamic")
    assert "\n" not in str(err.value) and "out.quantize-failed.log" in str(err.value)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.quantize-failed.log"]  # no model, no temp dir


def test_group_size_fits_layer_widths() -> None:
    assert fit_group_size({128, 384}, 128) == 128  # the tiny model
    assert fit_group_size({576, 1536}, 128) == 64  # SmolLM2-135M: 576 = 9 * 64
    assert fit_group_size({576}, None) is None  # presets without groups
    with pytest.raises(ValueError, match="no weight group size"):
        fit_group_size({100}, 128)


def test_calibration_text_is_deterministic() -> None:
    a, b = calibration_texts(16, seed=3), calibration_texts(16, seed=3)
    assert a == b and a != calibration_texts(16, seed=4)
    assert len(set(a)) == 16 and all(len(t) > 40 for t in a)


# --------------------------------------------------------------------------- FP8_DYNAMIC checkpoint


def test_fp8_dynamic_writes_compressed_tensors(fp8_dir: Path, tiny_model_dir: Path) -> None:
    qc = json.loads((fp8_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    w, a = group["weights"], group["input_activations"]
    assert (w["type"], w["num_bits"], w["strategy"], w["dynamic"]) == ("float", 8, "channel", False)
    assert (a["type"], a["num_bits"], a["strategy"], a["dynamic"]) == ("float", 8, "token", True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # copied verbatim
        assert (fp8_dir / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    assert read_scheme(fp8_dir) == "fp8_dynamic"
    provenance = json.loads((fp8_dir / PROVENANCE).read_text())
    assert provenance["cpu_dtype"] == "float32" and provenance["llmcompressor"]
    assert sorted(p.name for p in fp8_dir.parent.iterdir()) == [fp8_dir.name]  # no temp dir or log left


def test_transformers_loads_fp8_checkpoint(fp8_dir: Path, tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[0, 3, 17, 250, 999, 42, 7]])
    with torch.no_grad():
        quantized = AutoModelForCausalLM.from_pretrained(fp8_dir).eval()(ids).logits
        reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()(ids).logits
    assert quantized.shape == reference.shape
    assert torch.isfinite(quantized).all()
    # fp8 (e4m3) weights: ~2^-4 relative rounding, far from the logits' own spread
    assert (quantized - reference).abs().max() < 0.25 * reference.abs().max()
    assert not torch.equal(quantized, reference)


def test_main_cli_quantize(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert llmcompressor_available(), NO_LLMCOMPRESSOR
    dst = tmp_path / "q"
    cli = [sys.executable, "-m", "deploy.cli", "quantize", str(tiny_model_dir), str(dst), "--scheme"]
    proc = subprocess.run([*cli, "fp8_dynamic"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "with fp8_dynamic into" in proc.stdout and read_scheme(dst) == "fp8_dynamic"
    proc = subprocess.run([*cli, "w8a8_smoothquant"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "rescales activations" in proc.stderr


# ------------------------------------------------------------------------------ vLLM, the real check


@pytest.mark.integration
@pytest.mark.slow
def test_fp8_dynamic_base_serves_adapter_like_reference(
    fp8_dir: Path, tiny_model_dir: Path, label_adapters: Path, tmp_path: Path
) -> None:
    """The quantized tiny base (FP8_DYNAMIC) with an adapter trained on the unquantized base, served
    through the gateway: the same answers as transformers+peft on the unquantized base."""
    from tests.adapter_factory import EVAL_PROMPTS, greedy_answers
    from tests.conftest import live_settings, start_gateway

    reference = greedy_answers(tiny_model_dir, label_adapters / "alpha", EVAL_PROMPTS)  # unquantized, peft
    assert reference == ["alpha<|im_end|>"] * len(EVAL_PROMPTS)
    settings = live_settings(
        tiny_model_dir, tmp_path, quantization="fp8_dynamic", adapter_root=str(label_adapters),
        state_dir=str(tmp_path / "state"), adapters={"alpha": {"path": "alpha"}},
        aliases={"labels-fp8": {"adapter": "alpha", "defaults": {"temperature": 0, "max_tokens": 8}}},
    )  # fmt: skip
    live = start_gateway(settings, str(fp8_dir))  # the checkpoint prepare_quantized() makes for this setting
    try:
        served = []
        with live.client() as c:
            for prompt in EVAL_PROMPTS:
                body = {"model": "labels-fp8", "messages": [{"role": "user", "content": prompt}]}
                resp = c.post("/v1/chat/completions", json=body)
                assert resp.status_code == 200, resp.text
                assert resp.headers["x-loraloop-adapter"] == "alpha"
                choice = resp.json()["choices"][0]
                served.append((choice["message"]["content"], choice["finish_reason"]))
    finally:
        live.stop()
    assert served == [("alpha", "stop")] * len(EVAL_PROMPTS)
    assert [text for text, _ in served] == [r.removesuffix("<|im_end|>") for r in reference]
