"""Quantize a base model for serving with LoRA adapters (llm-compressor, compressed-tensors format).

``quantize(src, dst, scheme)`` runs llm-compressor's ``oneshot`` on a local Hugging Face model directory
and writes a compressed-tensors checkpoint that vLLM loads directly (``--model dst``), with the source's
tokenizer files and chat template copied verbatim. ``core.quantization.SCHEMES`` says, for every scheme
offered, where the result can be served and whether it keeps adapters trained on the unquantized base
working; see docs/quantization.md for the measurements behind it. ``RECIPES`` here is how each is made.

Adapter policy: schemes that rescale activations (SmoothQuant, AWQ) fold per-channel scales into the base
weights, so a LoRA trained on the unquantized base no longer matches the layers it patches (agreement fell
from ~90 % to ~7 % in our measurements). loraloop serves adapters, so ``quantize`` refuses those schemes
unless ``allow_adapter_breaking=True`` (CLI ``--force``), and ``check_adapter_compatibility`` refuses to
serve such a base with adapters configured.

llm-compressor runs in a child process: its releases pin a ``compressed-tensors`` that differs from the
one vLLM pins, so it is installed apart from the serving environment (``pip install --no-deps --target
$VIRTUAL_ENV/llmcompressor llmcompressor==0.14.0.1 compressed-tensors==0.19.0``) and put on the child's
``sys.path`` only; vLLM keeps its own ``compressed-tensors``. The child also keeps llm-compressor's global
state and monkey-patches out of the caller's process. No data set is downloaded: calibration text is
generated deterministically here and tokenized with the source tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.errors import LoraloopError
from core.quantization import (
    PROVENANCE,
    SCHEMES,
    QuantizationRefused,
    SchemeInfo,
    check_adapter_compatibility,
    get_scheme,
    read_scheme,
)

from .prepare import swap_into_place

log = logging.getLogger(__name__)

#: Pinned versions of the quantizer and of the compressed-tensors release it requires.
LLMCOMPRESSOR_REQUIREMENT = "llmcompressor==0.14.0.1"
COMPRESSED_TENSORS_REQUIREMENT = "compressed-tensors==0.19.0"
#: Overrides where llm-compressor is looked for (``os.pathsep``-separated directories).
PATH_ENV = "LORALOOP_LLMCOMPRESSOR_PATH"
#: Modules never quantized (the LM head is small and sensitive; vLLM's LoRA layers expect it plain).
IGNORE = ["lm_head"]
MAX_CALIBRATION_SAMPLES = 4096
CALIBRATION_MAX_TOKENS = 512

#: Tokenizer and template files copied verbatim from the source directory.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)  # fmt: skip
_EXTRA_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE")


class QuantizationFailed(LoraloopError, RuntimeError):
    """llm-compressor is missing or failed; the message is one line (details in the worker log)."""


# ------------------------------------------------------------------------------------------ schemes


#: A recipe builder: ``build(group_size)`` returns llm-compressor modifiers; ``group_size`` (grouped
#: presets only) replaces the preset's weight group size when the model's widths need a smaller one.
RecipeBuilder = Callable[[int | None], list[Any]]


def _target(preset: str, group_size: int | None) -> dict[str, Any]:
    """Modifier keywords applying ``preset`` to every Linear layer but the ignored ones."""
    if group_size is None:
        return {"targets": ["Linear"], "scheme": preset, "ignore": list(IGNORE)}
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(preset, ["Linear"])
    assert scheme.weights is not None
    scheme.weights = scheme.weights.model_copy(update={"group_size": group_size})
    return {"config_groups": {"group_0": scheme}, "ignore": list(IGNORE)}


def _plain(preset: str) -> RecipeBuilder:
    """Round-to-nearest quantization (``QuantizationModifier``)."""

    def build(group_size: int | None = None) -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [QuantizationModifier(**_target(preset, group_size))]

    return build


def _gptq(preset: str) -> RecipeBuilder:
    """GPTQ: error-compensating weight rounding from calibration activations; activations not rescaled."""

    def build(group_size: int | None = None) -> list[Any]:
        from llmcompressor.modifiers.quantization import GPTQModifier

        return [GPTQModifier(**_target(preset, group_size), dampening_frac=0.01)]

    return build


def _awq(preset: str) -> RecipeBuilder:
    """AWQ: scales salient input channels up (and the previous op's output down), then quantizes."""

    def build(group_size: int | None = None) -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [AWQModifier(duo_scaling=True), QuantizationModifier(**_target(preset, group_size))]

    return build


def _smoothquant(preset: str, strength: float = 0.8) -> RecipeBuilder:
    """SmoothQuant: migrates activation outliers into the weights, then GPTQ."""

    def build(group_size: int | None = None) -> list[Any]:
        from llmcompressor.modifiers.quantization import GPTQModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=strength),
                GPTQModifier(**_target(preset, group_size), dampening_frac=0.01)]  # fmt: skip

    return build


#: The llm-compressor recipe of each scheme in core.quantization.SCHEMES (a test checks both name the same).
RECIPES: dict[str, RecipeBuilder] = {
    "fp8_dynamic": _plain("FP8_DYNAMIC"),
    "w4a8": _gptq("W4A8"),
    "w4a16": _gptq("W4A16"),
    "w4a16_awq": _awq("W4A16_ASYM"),
    "w8a8_int8": _gptq("W8A8"),
    "w8a16": _gptq("W8A16"),
    "fp8_static": _plain("FP8"),
    "fp8_block": _plain("FP8_BLOCK"),
    "w8a8_smoothquant": _smoothquant("W8A8"),
}


def prepare_quantized(model_path: str, scheme: str, cache_dir: Path, *, adapters_configured: bool) -> str:
    """The served base quantized with ``scheme`` (settings `quantization`): made once with
    :func:`quantize` into ``cache_dir/<model>-<scheme>`` and reused; refused when it would break adapters
    or cannot run on this machine's vLLM."""
    from serving.managed import detect_device

    check_adapter_compatibility(scheme, adapters_configured, device=detect_device("auto"))
    dst = Path(cache_dir).expanduser() / f"{Path(model_path).name}-{get_scheme(scheme).name}"
    if read_scheme(dst) != get_scheme(scheme).name:
        quantize(Path(model_path), dst, scheme, overwrite=dst.exists())
    return str(dst)


# ------------------------------------------------------------------------------- calibration text

_TOPICS = ["the weather", "a train ticket", "my laptop", "the invoice", "a birthday party", "the garden",
           "quantum physics", "a job interview", "the football match", "coffee", "a password reset",
           "the city library", "a broken washing machine", "holiday plans", "the quarterly report",
           "a recipe for soup", "the new phone", "learning Spanish", "a flight delay",
           "the electricity bill"]  # fmt: skip
_ASKS = ["Can you explain", "Please summarise", "What do you know about", "Write a short note about",
         "Give me three tips about", "Tell me something interesting about", "How should I deal with",
         "Translate into French a sentence about", "Write a haiku about", "List the pros and cons of"]  # fmt: skip
_FACTS = [
    "Water boils at 100 degrees Celsius at sea level.", "The Earth orbits the Sun once every 365.25 days.",
    "Paris is the capital of France.", "A week has seven days and a year has twelve months.",
    "Light travels at about 300,000 kilometres per second.", "Bees communicate by dancing.",
    "The Pacific is the largest ocean on Earth.", "Python is a popular programming language.",
    "Mount Everest is 8,849 metres high.", "Photosynthesis turns sunlight, water and CO2 into sugar.",
]  # fmt: skip
_REPLIES = [
    "Sure, here is a short answer.", "That is a good question.", "I am not certain, but here is what I know.",
    "Let me break it down step by step.", "In short: it depends on the details.", "Here are a few ideas.",
    "Thanks for asking!", "Of course. First, check the basics.", "The short version is yes.",
    "Unfortunately, no.",
]  # fmt: skip
_CODE = [
    "def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i * i)\n",
    "SELECT name, total FROM orders WHERE total > 100 ORDER BY total DESC;",
    "const xs = [1, 2, 3].map(x => x * 2);", "if err != nil {\n    return err\n}",
    '{"id": 42, "status": "ok", "items": [1, 2, 3]}',
]  # fmt: skip
_OTHER_LANGUAGES = ["Bonjour, comment allez-vous ?", "Guten Morgen, wie geht es Ihnen?",
                    "Hola, ¿qué tal estás hoy?", "Buongiorno, come stai?", "Olá, tudo bem?"]  # fmt: skip


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(7)
    topic = rng.choice(_TOPICS)
    if kind == 0:
        return f"{rng.choice(_ASKS)} {topic}?"
    if kind == 1:
        return rng.choice(_FACTS)
    if kind == 2:
        return f"{rng.choice(_REPLIES)} When it comes to {topic}, {rng.choice(_FACTS).lower()}"
    if kind == 3:
        return rng.choice(_CODE)
    if kind == 4:
        return f"It cost ${rng.randint(1, 999)}.{rng.randint(0, 99):02d} and took {rng.randint(2, 40)} days."
    if kind == 5:
        items = rng.sample(_TOPICS, 3)
        return "Agenda:\n" + "".join(f"{i + 1}. {t}\n" for i, t in enumerate(items))
    return rng.choice(_OTHER_LANGUAGES)


def calibration_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` varied multi-sentence texts (questions, facts, replies, code, numbers, other languages);
    the same for the same ``seed``."""
    rng = random.Random(seed)
    return [" ".join(_sentence(rng) for _ in range(rng.randint(4, 10))) for _ in range(n)]


def calibration_dataset(tokenizer: Any, n: int, seed: int = 0, max_tokens: int = CALIBRATION_MAX_TOKENS) -> Any:
    """A ``datasets.Dataset`` of ``n`` tokenized samples; every other one is a chat rendered with the
    tokenizer's chat template (what a served model mostly sees), the rest plain text."""
    from datasets import Dataset

    template = getattr(tokenizer, "chat_template", None)
    input_ids: list[list[int]] = []
    for i, text in enumerate(calibration_texts(n, seed)):
        if template and i % 2 == 0:
            cut = max(1, len(text) // 3)
            chat = [{"role": "user", "content": text[:cut]}, {"role": "assistant", "content": text[cut:]}]
            rendered = tokenizer.apply_chat_template(chat, tokenize=False)
            ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        input_ids.append(list(ids)[:max_tokens])
    return Dataset.from_dict({"input_ids": input_ids, "attention_mask": [[1] * len(x) for x in input_ids]})


# ---------------------------------------------------------------------------------------- quantize


def llmcompressor_paths() -> list[Path]:
    """Directories put first on the worker's ``sys.path``: ``$LORALOOP_LLMCOMPRESSOR_PATH``, else
    ``<venv>/llmcompressor`` when it exists."""
    env = os.environ.get(PATH_ENV)
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    default = Path(sys.prefix) / "llmcompressor"
    return [default] if default.is_dir() else []


def llmcompressor_available() -> bool:
    """Whether the worker can import llm-compressor (found on its extra path or installed normally)."""
    return any((p / "llmcompressor").is_dir() for p in llmcompressor_paths()) or (
        importlib.util.find_spec("llmcompressor") is not None
    )


def install_hint() -> str:
    return (f"pip install --no-deps --target {Path(sys.prefix) / 'llmcompressor'} "
            f"{LLMCOMPRESSOR_REQUIREMENT} {COMPRESSED_TENSORS_REQUIREMENT}")  # fmt: skip


@contextmanager
def _staging(dst: Path, overwrite: bool) -> Iterator[Path]:
    """An empty directory next to ``dst`` that replaces ``dst`` atomically when the block succeeds."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        for item in tmp.rglob("*"):
            item.chmod(0o755 if item.is_dir() else 0o644)
        if (dst.exists() or dst.is_symlink()) and not overwrite and not (dst.is_dir() and not any(dst.iterdir())):
            raise QuantizationRefused(f"{dst} appeared while quantizing; not replacing it")
        swap_into_place(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _validate(src: Path, dst: Path, info: SchemeInfo, calibration_samples: int, overwrite: bool) -> None:
    if not (src / "config.json").is_file():
        raise QuantizationRefused(f"{src} is not a model directory (no config.json)")
    if not any(src.glob("*.safetensors")):
        raise QuantizationRefused(f"{src} has no *.safetensors weights")
    try:
        config = json.loads((src / "config.json").read_text())
    except ValueError as exc:
        raise QuantizationRefused(f"{src}/config.json is not valid JSON: {exc}") from None
    if isinstance(config, dict) and config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise QuantizationRefused(f"{src} is already quantized ({method}); quantize the unquantized base")
    if dst == src or src in dst.parents:
        raise QuantizationRefused(f"destination {dst} must not be the source or lie inside it")
    if dst.exists() and not dst.is_dir():
        raise QuantizationRefused(f"destination {dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise QuantizationRefused(f"{dst} is not empty; pass overwrite=True (CLI --overwrite) to replace it")
    if info.needs_calibration and not 1 <= calibration_samples <= MAX_CALIBRATION_SAMPLES:
        raise QuantizationRefused(f"calibration_samples must be 1..{MAX_CALIBRATION_SAMPLES}, "
                                  f"got {calibration_samples}")  # fmt: skip


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line or "Exception" in line:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def quantize(src: Path, dst: Path, scheme: str, *, calibration_samples: int = 64, seed: int = 0,
             allow_adapter_breaking: bool = False, overwrite: bool = False) -> Path:  # fmt: skip
    """Quantize the model in ``src`` with ``scheme`` into ``dst`` (compressed-tensors format) and return
    ``dst``. ``dst`` is written next to itself and renamed into place, so it is either complete or absent.

    Raises QuantizationRefused (bad arguments, an adapter-breaking scheme without
    ``allow_adapter_breaking``, a non-empty ``dst`` without ``overwrite``) before any work, and
    QuantizationFailed when llm-compressor is missing or fails."""
    src, dst = Path(src).expanduser().absolute(), Path(dst).expanduser().absolute()
    info = get_scheme(scheme)
    if info.rescales_activations and not allow_adapter_breaking:
        raise QuantizationRefused(
            f"scheme {info.name!r} rescales activations and breaks LoRA adapters trained on the unquantized "
            f"base; use fp8_dynamic or w4a8, or pass allow_adapter_breaking=True (CLI --force)"
        )
    _validate(src, dst, info, calibration_samples, overwrite)
    if not llmcompressor_available():
        raise QuantizationFailed(f"llm-compressor is not installed; install it with: {install_hint()}")

    started = time.monotonic()
    dst.parent.mkdir(parents=True, exist_ok=True)
    repo_root = Path(__file__).resolve().parents[2]
    with _staging(dst, overwrite) as tmp, tempfile.TemporaryDirectory(prefix=".quantize-work-",
                                                                      dir=dst.parent) as work:  # fmt: skip
        result_file = Path(work) / "result.json"
        spec = {"src": str(src), "out": str(tmp), "scheme": info.name, "samples": calibration_samples,
                "seed": seed, "result": str(result_file)}  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [*map(str, llmcompressor_paths()), str(repo_root), *filter(None, [env.get("PYTHONPATH")])]
        )
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")  # fmt: skip
        log_path = Path(work) / "quantize.log"
        with log_path.open("w") as log_fh:
            proc = subprocess.run([sys.executable, "-m", __name__, "--worker", json.dumps(spec)],
                                  cwd=work, env=env, stdout=log_fh, stderr=subprocess.STDOUT, check=False)  # fmt: skip
        if proc.returncode != 0 or not result_file.is_file():
            output = log_path.read_text(errors="replace")
            kept = dst.parent / f"{dst.name}.quantize-failed.log"
            kept.write_text(output)
            raise QuantizationFailed(f"llm-compressor {info.name} failed (exit {proc.returncode}): "
                                     f"{_last_error_line(output)} (log: {kept})")  # fmt: skip
        result = json.loads(result_file.read_text())
        for name in (*_TOKENIZER_FILES, *_EXTRA_FILES):
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        provenance = {
            "scheme": info.name, "preset": info.preset, "source": str(src), "runs": info.runs,
            "rescales_activations": info.rescales_activations,
            "calibration_samples": calibration_samples if info.needs_calibration else 0,
            "calibration_data": f"{__name__}.calibration_texts" if info.needs_calibration else None,
            "seed": seed, "cpu_dtype": info.cpu_dtype, **result,
        }  # fmt: skip
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        config = json.loads((tmp / "config.json").read_text())
        if config.get("quantization_config", {}).get("quant_method") != "compressed-tensors":
            raise QuantizationFailed(f"llm-compressor wrote no compressed-tensors quantization_config to {dst}")
    (dst.parent / f"{dst.name}.quantize-failed.log").unlink(missing_ok=True)  # a stale one from a failed try
    log.info("quantized %s with %s into %s in %.1fs", src, info.name, dst, time.monotonic() - started)
    return dst


def fit_group_size(widths: set[int], preferred: int | None) -> int | None:
    """The largest of ``preferred``, its half, ... down to 32, that divides every input width (None for
    presets without groups). vLLM's int4 kernels need it to divide each layer's input features."""
    if preferred is None:
        return None
    size = preferred
    while size >= 32:
        if all(w % size == 0 for w in widths):
            return size
        size //= 2
    raise ValueError(f"no weight group size from {preferred} down to 32 divides the layer widths "
                     f"{sorted(widths)}; use fp8_dynamic")  # fmt: skip


def _quantized_widths(model: Any) -> set[int]:
    import torch

    return {m.in_features for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in IGNORE}  # fmt: skip


def _worker(spec: dict[str, Any]) -> None:
    """Runs in the child process: oneshot + save_compressed into ``spec['out']``."""
    import compressed_tensors
    import llmcompressor
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = SCHEMES[spec["scheme"]]
    if not torch.accelerator.is_available():
        # llm-compressor 0.14's AWQ pins cached activations (a transfer speed-up) and pin_memory() raises
        # without an accelerator; pinning changes no value, so skip it on CPU-only machines.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    random.seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_pretrained(spec["src"], dtype="auto")
    kwargs: dict[str, Any] = {}
    if info.needs_calibration:
        tokenizer = AutoTokenizer.from_pretrained(spec["src"])
        max_tokens = min(CALIBRATION_MAX_TOKENS, int(getattr(model.config, "max_position_embeddings", 0) or 512))
        kwargs = {
            "dataset": calibration_dataset(tokenizer, spec["samples"], spec["seed"], max_tokens),
            "num_calibration_samples": spec["samples"], "max_seq_length": max_tokens,
            "shuffle_calibration_samples": False,
        }  # fmt: skip
    group_size = fit_group_size(_quantized_widths(model), info.group_size)
    # None keeps the preset untouched (its own group size, or no groups at all)
    override = group_size if group_size != info.group_size else None
    oneshot(model=model, recipe=RECIPES[info.name](override), **kwargs)
    model.save_pretrained(spec["out"], save_compressed=True)
    result = {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
              "group_size": group_size}  # fmt: skip
    Path(spec["result"]).write_text(json.dumps(result))


if __name__ == "__main__":  # the worker process (see quantize): python -m retrain.models.quantize --worker SPEC
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        sys.exit("usage: python -m retrain.models.quantize --worker SPEC (use `loraloop quantize`)")
    _worker(json.loads(sys.argv[2]))
