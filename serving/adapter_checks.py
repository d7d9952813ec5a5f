"""Checks a LoRA adapter directory before vLLM is asked to load it.

Everything is decided from ``adapter_config.json`` and the safetensors *header* (no tensor is read), so a
check costs a few small reads. Each refusal is an :class:`AdapterRejected` with a stable ``code`` and a
one-line message that tells the operator what to fix.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex  # the `re` dialect plus match timeouts: target/rank patterns come from untrusted configs

from core.errors import UsageError

CODES = frozenset(
    {
        "outside_root",
        "not_found",
        "pickled_weights",
        "missing_config",
        "bad_config",
        "base_mismatch",
        "rank_too_high",
        "unknown_target_modules",
        "corrupt_safetensors",
        "shape_mismatch",
    }
)

#: File kinds an adapter directory may hold; anything else could be a pickle in disguise.
SAFE_SUFFIXES = frozenset({".json", ".safetensors", ".md", ".txt", ".jinja"})
SAFE_NAMES = frozenset({".gitattributes"})
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
PATTERN_BUDGET_S = 1.0  # total time all target/rank regexes of one adapter may take
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"base_model\.model\.(?P<mod>[\w.]+?)\.(?P<kind>lora_[AB]\.weight|lora_embedding_[AB])")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class AdapterRejected(UsageError, ValueError):
    """An adapter that must not reach vLLM; ``code`` is machine-readable, ``str()`` is for people."""

    def __init__(self, code: str, message: str) -> None:
        if code not in CODES:
            raise ValueError(f"unknown rejection code {code!r}")
        self.code = code
        self.message = " ".join(message.split())
        super().__init__(self.message)


_reject = AdapterRejected


@dataclass(frozen=True)
class BaseModelInfo:
    """What the served base model looks like, as far as LoRA shapes are concerned."""

    names: frozenset[str]
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    vocab_size: int
    module_names: frozenset[str] = frozenset((*ATTN, *MLP, "lm_head", "embed_tokens"))

    @classmethod
    def from_model_dir(cls, model_dir: Path, extra_names: Iterable[str] = ()) -> BaseModelInfo:
        """Read ``config.json`` (Llama/Mistral/Qwen2 style; no weights) of the base in ``model_dir``."""
        model_dir = Path(model_dir)
        try:
            cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
            text = cfg.get("text_config") or cfg
            heads, hidden = int(text["num_attention_heads"]), int(text["hidden_size"])
            head_dim = int(text.get("head_dim") or hidden // heads)
            names = {str(model_dir), str(model_dir.resolve()), *extra_names}
            if isinstance(cfg.get("_name_or_path"), str):
                names.add(cfg["_name_or_path"])
            return cls(
                frozenset(n for n in names if n),
                hidden,
                int(text["intermediate_size"]),
                heads,
                int(text.get("num_key_value_heads") or heads),
                head_dim,
                int(text["num_hidden_layers"]),
                int(text["vocab_size"]),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"cannot read the base model's config.json in {model_dir}: {exc}") from exc

    def dims(self, leaf: str) -> tuple[int, int] | None:
        """(in_features, out_features) of a leaf module, or None when not known."""
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
            "lm_head": (h, self.vocab_size),
            "embed_tokens": (self.vocab_size, h),
        }.get(leaf)

    def module_paths(self) -> dict[str, str]:
        """Full module names (as peft sees them in a Llama-style model) -> leaf name."""
        out: dict[str, str] = {}
        for leaf in sorted(self.module_names):
            if leaf == "lm_head":
                out["lm_head"] = leaf
            elif leaf == "embed_tokens":
                out["model.embed_tokens"] = leaf
            else:
                part = "self_attn." if leaf in ATTN else "mlp." if leaf in MLP else ""
                out.update({f"model.layers.{i}.{part}{leaf}": leaf for i in range(self.num_hidden_layers)})
        return out


@dataclass(frozen=True)
class ValidatedAdapter:
    path: Path  # resolved directory
    rank: int  # the largest LoRA rank in the adapter (r or any rank_pattern value)
    alpha: float
    target_modules: frozenset[str]  # leaf module names the adapter targets
    base_model: str  # base_model_name_or_path as written in adapter_config.json
    size_bytes: int  # size of adapter_model.safetensors


class _Patterns:
    """Regex matching (as peft does it) with one time budget per adapter: no ReDoS through a config file."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + PATTERN_BUDGET_S

    def match(self, pattern: str, text: str, *, full: bool = True) -> bool:
        try:
            re.compile(pattern)  # peft uses `re`; refuse what `re` would refuse
            left = max(self.deadline - time.monotonic(), 0.001)
            return (regex.fullmatch if full else regex.match)(pattern, text, timeout=left) is not None
        except (re.error, TimeoutError) as exc:
            raise _reject("bad_config", f"bad or too slow regular expression {pattern!r} in {CONFIG}: {exc}"
                          ) from exc  # fmt: skip


def _inside(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def _resolve_dir(path: str | Path, root: Path) -> tuple[Path, Path]:
    root_r = Path(root).resolve()
    p = Path(path) if Path(path).is_absolute() else root_r / path
    try:
        if not _inside(p.resolve(), root_r):
            raise _reject(
                "outside_root",
                f"adapter path {str(path)!r} resolves outside the adapter root "
                f"{str(root_r)!r}; copy the adapter under the root (symlinks out are refused)",
            )
        resolved = p.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise _reject("not_found", f"adapter directory {str(path)!r} does not exist under {root_r}") from exc
    if not resolved.is_dir():
        raise _reject("not_found", f"adapter path {str(path)!r} is not a directory")
    return resolved, root_r


def _scan_files(adir: Path, root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(adir, followlinks=False):
        for name in (*dirnames, *filenames):
            f = Path(dirpath, name)
            rel = str(f.relative_to(adir))
            if f.is_symlink():
                try:
                    target = f.resolve()
                except (OSError, RuntimeError) as exc:
                    raise _reject("outside_root", f"{rel!r} in the adapter is a broken symlink") from exc
                if not _inside(target, root):
                    raise _reject(
                        "outside_root",
                        f"{rel!r} in the adapter is a symlink to {str(target)!r}, "
                        "outside the adapter root; replace it with a real file",
                    )
            if name in filenames and f.suffix.lower() not in SAFE_SUFFIXES and name not in SAFE_NAMES:
                raise _reject(
                    "pickled_weights",
                    f"{rel!r}: only safetensors weights and json/md/txt files "
                    "are allowed (.bin/.pt/.pth/.pkl/.ckpt may run code when loaded); save the "
                    "adapter with safe_serialization and remove other files",
                )
    if not (adir / WEIGHTS).is_file():
        raise _reject("not_found", f"{WEIGHTS} is missing in {adir}; save with safe_serialization=True")


def _read_config(adir: Path) -> dict[str, Any]:
    f = adir / CONFIG
    if not f.is_file():
        raise _reject("missing_config", f"{CONFIG} is missing in {str(adir)!r}; save the adapter with peft")
    try:
        if f.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError("larger than 1 MiB")
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _reject("bad_config", f"{CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise _reject("bad_config", f"{CONFIG} must hold a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise _reject("bad_config", f"peft_type is {cfg.get('peft_type')!r}; only LORA can be served")
    if cfg.get("use_dora"):
        raise _reject("bad_config", "DoRA adapters (use_dora=true) are not supported by vLLM")
    return cfg


def _int_rank(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _reject("bad_config", f"{what} must be a positive integer, not {value!r}")
    return value


def _base_matches(given: str, names: frozenset[str]) -> bool:
    """Exact name, same directory after resolving, or a path/hub id whose last component is a name."""
    if not given or given in names:
        return bool(given)

    def resolved(s: str) -> Path | None:
        try:
            return Path(s).resolve() if Path(s).exists() else None
        except (OSError, RuntimeError, ValueError):
            return None

    mine = resolved(given)
    if mine is not None and mine in {resolved(n) for n in names}:
        return True
    last = given.rstrip("/").rsplit("/", 1)[-1]
    return bool(last) and last != given and last in names


def _targets(tm: Any, base: BaseModelInfo, paths: dict[str, str], pats: _Patterns) -> frozenset[str]:
    if tm == "all-linear":
        return frozenset(base.module_names - {"lm_head", "embed_tokens"})
    if isinstance(tm, str):
        found = frozenset(leaf for full, leaf in paths.items() if pats.match(tm, full))
        if not found:
            raise _reject(
                "unknown_target_modules",
                f"target_modules regex {tm!r} matches no module of the "
                f"base (modules: {', '.join(sorted(base.module_names))})",
            )
        return found
    if not isinstance(tm, list) or not tm or not all(isinstance(t, str) and t for t in tm):
        raise _reject("bad_config", f"target_modules must be a non-empty list or a regex, not {tm!r}")

    def hits(t: str) -> set[str]:
        return {leaf for full, leaf in paths.items() if full == t or full.endswith("." + t)}

    unknown = sorted(t for t in tm if not hits(t))
    if unknown:
        raise _reject(
            "unknown_target_modules",
            f"target_modules {unknown} do not exist in the base (modules: {', '.join(sorted(base.module_names))})",
        )
    return frozenset().union(*(hits(t) for t in tm))


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape), after checking the header is self-consistent and fits the file."""

    def bad(why: str) -> AdapterRejected:
        return _reject("corrupt_safetensors", f"{path.name} is not valid safetensors: {why}; re-save it")

    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in pairs}) != len(pairs):
            raise bad("duplicate keys in the header")
        return dict(pairs)

    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise bad("shorter than 8 bytes")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise bad(f"header length {n} does not fit a file of {size} bytes (truncated?)")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_dupes)
    except ValueError as exc:
        raise bad(f"header is not JSON ({exc})") from exc
    if not isinstance(header, dict) or not isinstance(header.pop("__metadata__", {}), dict):
        raise bad("header must be a JSON object")
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = all(type(x) is int and x >= 0 for x in (*shape, begin, end))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok or not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise bad(f"entry {name!r} has a bad dtype, shape or data_offsets")
        if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise bad(
                f"tensor {name!r}: data_offsets span {end - begin} bytes, shape {shape} {dtype} needs "
                f"{math.prod(shape) * DTYPE_SIZES[dtype]}"
            )
        spans.append((begin, end, name))
        out[name] = (dtype, tuple(shape))
    expected = 0
    for begin, end, name in sorted(spans):
        if begin != expected:
            raise bad(f"tensor {name!r} overlaps another or leaves a gap")
        expected = end
    if expected != size - 8 - n:
        raise bad(
            f"tensor data needs {expected} bytes but the file has {size - 8 - n} (truncated?)"
            if expected > size - 8 - n
            else "trailing bytes after the tensor data"
        )
    return out


def _check_shapes(
    tensors: dict[str, tuple[str, tuple[int, ...]]],
    base: BaseModelInfo,
    targets: frozenset[str],
    ranks: tuple[int, dict[str, int]],
    pats: _Patterns,
) -> None:
    def bad(msg: str) -> AdapterRejected:
        return _reject("shape_mismatch", f"{msg}; the adapter was not trained for this base model")

    seen: dict[str, set[str]] = {}
    for key, (dtype, shape) in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise bad(f"unexpected tensor {key!r} (only lora_A/lora_B weights can be served)")
        mod, kind = m["mod"], m["kind"]
        leaf = mod.rsplit(".", 1)[-1]
        if leaf not in base.module_names:
            raise _reject("unknown_target_modules", f"tensor {key!r} is for {leaf!r}, which the base lacks")
        if leaf not in targets:
            raise bad(f"tensor {key!r} is for {leaf!r}, which is not in target_modules")
        layer = _LAYER.search(mod)
        if layer and int(layer[1]) >= base.num_hidden_layers:
            raise bad(f"tensor {key!r} is for layer {layer[1]}; the base has {base.num_hidden_layers} layers")
        if dtype not in FLOAT_DTYPES:
            raise bad(f"tensor {key!r} has dtype {dtype}; LoRA weights must be F32/F16/BF16")
        if (leaf == "embed_tokens") != kind.startswith("lora_embedding"):
            raise bad(f"tensor {key!r} is the wrong kind of LoRA weight for {leaf!r}")
        r = next((v for p, v in ranks[1].items() if pats.match(rf"(.*\.)?({p})$", mod, full=False)), ranks[0])
        dims = base.dims(leaf)
        is_a = kind.startswith(("lora_A", "lora_embedding_A"))
        want = None if dims is None else ((r, dims[0]) if is_a else (dims[1], r))
        if len(shape) != 2 or shape[0 if is_a else 1] != r or (want is not None and shape != want):
            raise bad(
                f"tensor {key!r} has shape {list(shape)}, expected "
                f"{list(want) if want else ('[r, in]' if is_a else '[out, r]')} with r={r}"
            )
        seen.setdefault(mod, set()).add("A" if is_a else "B")
    if not seen:
        raise bad(f"{WEIGHTS} holds no LoRA tensors")
    half = sorted(mod for mod, ab in seen.items() if len(ab) != 2)
    if half:
        raise bad(f"modules {half[:3]} have only one of lora_A/lora_B")


def validate_adapter(path: str | Path, *, root: Path, base: BaseModelInfo, max_rank: int) -> ValidatedAdapter:
    """Check the adapter at ``path`` (relative paths are under ``root``); raise AdapterRejected if unfit."""
    adir, root_r = _resolve_dir(path, root)
    _scan_files(adir, root_r)
    cfg = _read_config(adir)
    given = cfg.get("base_model_name_or_path")
    if not isinstance(given, str) or not _base_matches(given, base.names):
        raise _reject(
            "base_mismatch",
            f"adapter was trained on base {given!r}, but this server serves "
            f"{sorted(base.names)}; retrain it on the served base model",
        )
    r = _int_rank(cfg.get("r"), "r")
    pattern = cfg.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise _reject("bad_config", f"rank_pattern must be an object, not {pattern!r}")
    pattern = {str(k): _int_rank(v, f"rank_pattern[{k!r}]") for k, v in pattern.items()}
    rank = max([r, *pattern.values()])
    if rank > max_rank:
        raise _reject(
            "rank_too_high",
            f"adapter LoRA rank {rank} exceeds the server's max LoRA rank "
            f"{max_rank}; retrain with a smaller r or raise max_lora_rank",
        )
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise _reject("bad_config", f"lora_alpha must be a number, not {alpha!r}")
    pats = _Patterns()
    targets = _targets(cfg.get("target_modules"), base, base.module_paths(), pats)
    weights = adir / WEIGHTS
    _check_shapes(read_safetensors_header(weights), base, targets, (r, pattern), pats)
    return ValidatedAdapter(
        path=adir,
        rank=rank,
        alpha=float(alpha),
        target_modules=targets,
        base_model=given,
        size_bytes=weights.stat().st_size,
    )
