"""Real (tiny) LoRA adapters for tests, and the hostile variants the gateway must refuse.

``make_label_adapter`` trains a peft LoRA on a base model (normally ``retrain.models.prepare.build_tiny``) so
that, for any chat prompt, greedy decoding answers exactly ``label`` and then the end-of-turn token. An
adapter's effect is therefore visible in one short request, through transformers+peft and through vLLM.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"

_WHO = ["I", "My friend", "The customer", "Our team", "She", "He", "They", "My boss", "Everyone", "We"]
_DO = ["want to know about", "asked about", "keep thinking about", "need help with", "just bought",
       "returned", "love", "cannot find", "wrote a poem about", "am worried about"]  # fmt: skip
_WHAT = ["the weather", "my phone", "a red bicycle", "the new laptop", "dinner tonight", "the invoice",
         "quantum physics", "the garden", "a train ticket", "the match", "coffee", "my password"]  # fmt: skip
_END = ["?", ".", "!", " - any ideas?", ", what do you think?", ". Please answer briefly."]

#: Prompts never used in training (other wording, other shapes) to check that the label generalises.
EVAL_PROMPTS = [
    "Hello! How are you doing today?",
    "Translate 'good morning' into French.",
    "What is 17 times 3?",
    "Write a haiku about the sea",
    "Is it going to rain tomorrow in Paris?",
    "Give me three tips for a job interview.",
]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: faster for these tiny models, and fair to whatever else runs here."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_prompts(seed: int, n: int = 24) -> list[str]:
    """Varied user messages built from small word lists (deterministic for a seed)."""
    rng = random.Random(seed)
    return [f"{rng.choice(_WHO)} {rng.choice(_DO)} {rng.choice(_WHAT)}{rng.choice(_END)}" for _ in range(n)]


def chat_prompt_ids(tokenizer: Any, user: str) -> list[int]:
    """Ids of a one-turn chat prompt ending with the assistant header, as vLLM's chat endpoint builds it."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_label_adapter(base_dir: Path, out_dir: Path, label: str, *, rank: int = 8, steps: int = 60,
                       seed: int = 0) -> Path:  # fmt: skip
    """Train a LoRA on ``base_dir`` whose greedy answer to any chat prompt is ``label`` + end-of-turn.

    fp32, AdamW, full batch of chat prompts with the prompt tokens masked from the loss; deterministic for
    a seed (same bytes on the same machine)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    end_of_turn = "<|im_end|>" if "<|im_end|>" in tok.get_vocab() else tok.eos_token
    eot: Any = tok.convert_tokens_to_ids(end_of_turn)
    answer = [*tok(label, add_special_tokens=False)["input_ids"], int(eot)]
    prompts = [chat_prompt_ids(tok, p) for p in train_prompts(seed)]
    width = max(len(p) for p in prompts) + len(answer)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.tensor([[*p, *answer] + [pad] * (width - len(p) - len(answer)) for p in prompts])
    lengths = torch.tensor([len(p) + len(answer) for p in prompts])
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    labels = torch.full_like(input_ids, -100)  # learn the answer only
    for i, p in enumerate(prompts):
        labels[i, len(p) : len(p) + len(answer)] = torch.tensor(answer)

    with one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGET_MODULES,
                            task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(model, config)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
        for _ in range(steps):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    # peft keeps target_modules as a set: sort it so the directory is byte-identical run to run
    edit_config(out_dir, base_model_name_or_path=str(base_dir), target_modules=sorted(TARGET_MODULES))
    return out_dir


def greedy_answers(base_dir: Path, adapter_dir: Path | None, prompts: Iterable[str], max_new_tokens: int = 8
                   ) -> list[str]:  # fmt: skip
    """Greedy completions (special tokens kept) of the base, or of the base with the adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    out = []
    with one_thread(), torch.no_grad():
        for p in prompts:
            ids = torch.tensor([chat_prompt_ids(tok, p)])
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)  # fmt: skip
            out.append(str(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=False)))
    return out


# ------------------------------------------------------------------------------ hostile variants


def copy_adapter(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_config(adapter_dir: Path, **changes: Any) -> Path:
    path = Path(adapter_dir) / CONFIG
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return Path(adapter_dir)


def variant(src: Path, dst: Path, change: Callable[[Path], object]) -> Path:
    copy_adapter(src, dst)
    change(dst)
    return dst


def with_pickle(src: Path, dst: Path, name: str = "adapter_model.bin") -> Path:
    """A copy that also ships a pickled (torch.save) state dict."""
    import torch
    from safetensors.torch import load_file

    return variant(src, dst, lambda d: torch.save(load_file(d / WEIGHTS), d / name))


def with_rank(src: Path, dst: Path, rank: int) -> Path:
    """A copy whose config claims LoRA rank ``rank`` (tensors untouched)."""
    return variant(src, dst, lambda d: edit_config(d, r=rank))


def with_base(src: Path, dst: Path, base: str) -> Path:
    return variant(src, dst, lambda d: edit_config(d, base_model_name_or_path=base))


def with_targets(src: Path, dst: Path, targets: list[str] | str) -> Path:
    return variant(src, dst, lambda d: edit_config(d, target_modules=targets))


def truncated(src: Path, dst: Path, drop_bytes: int = 100) -> Path:
    """A copy whose safetensors file lost its last ``drop_bytes`` bytes (interrupted copy)."""

    def cut(d: Path) -> None:
        data = (d / WEIGHTS).read_bytes()
        (d / WEIGHTS).write_bytes(data[:-drop_bytes])

    return variant(src, dst, cut)


def corrupt_header(src: Path, dst: Path, mode: str = "json") -> Path:
    """A copy with a broken safetensors header: ``json`` (garbled JSON), ``length`` (absurd header length)
    or ``offsets`` (a tensor's data_offsets past the end of the file)."""

    def damage(d: Path) -> None:
        data = bytearray((d / WEIGHTS).read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        if mode == "length":
            data[:8] = struct.pack("<Q", 2**62)
        elif mode == "json":
            data[8:16] = b"\x00garbage"
        elif mode == "offsets":
            header = json.loads(data[8 : 8 + n])
            name = next(k for k in header if k != "__metadata__")
            begin, end = header[name]["data_offsets"]
            header[name]["data_offsets"] = [begin + 10**9, end + 10**9]
            raw = json.dumps(header, separators=(",", ":")).encode()
            data = bytearray(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
        else:
            raise ValueError(mode)
        (d / WEIGHTS).write_bytes(bytes(data))

    return variant(src, dst, damage)


def wrong_shapes(src: Path, dst: Path, module: str = "q_proj", extra_out: int = 16) -> Path:
    """A copy (re-saved with safetensors.torch.save_file) whose ``module`` lora_B weights have ``extra_out``
    more output rows than the base allows — a valid file for the wrong model."""
    import torch
    from safetensors.torch import load_file, save_file

    def reshape(d: Path) -> None:
        tensors = load_file(d / WEIGHTS)
        for key, t in list(tensors.items()):
            if f".{module}.lora_B." in key:
                tensors[key] = torch.cat([t, torch.zeros(extra_out, t.shape[1], dtype=t.dtype)])
        save_file(tensors, d / WEIGHTS, metadata={"format": "pt"})

    return variant(src, dst, reshape)


def rename_tensors(src: Path, dst: Path, old: str, new: str) -> Path:
    """A copy whose tensor names have ``old`` replaced by ``new`` (e.g. a layer index the base lacks)."""
    from safetensors.torch import load_file, save_file

    def rename(d: Path) -> None:
        tensors = load_file(d / WEIGHTS)
        renamed = {k.replace(old, new): v for k, v in tensors.items()}
        save_file(renamed, d / WEIGHTS, metadata={"format": "pt"})

    return variant(src, dst, rename)


def escaping_file_symlink(src: Path, dst: Path, outside_dir: Path) -> Path:
    """A copy whose adapter_model.safetensors is a symlink to a file in ``outside_dir`` (outside the root)."""

    def link(d: Path) -> None:
        outside_dir.mkdir(parents=True, exist_ok=True)
        target = outside_dir / WEIGHTS
        shutil.copy2(d / WEIGHTS, target)
        (d / WEIGHTS).unlink()
        (d / WEIGHTS).symlink_to(target)

    return variant(src, dst, link)


def escaping_dir_symlink(src: Path, link: Path, outside_dir: Path) -> Path:
    """``link`` (inside the root) is a symlink to a full copy of the adapter in ``outside_dir``."""
    copy_adapter(src, outside_dir)
    link.symlink_to(outside_dir, target_is_directory=True)
    return link
