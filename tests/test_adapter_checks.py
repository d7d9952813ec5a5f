"""serving.adapter_checks against real (tiny) peft adapters and their hostile variants."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from serving import adapter_checks as checks
from serving.adapter_checks import AdapterRejected, BaseModelInfo, ValidatedAdapter, validate_adapter
from tests import adapter_factory as af

MAX_RANK = 16
TARGETS = frozenset(af.TARGET_MODULES)


@dataclass(frozen=True)
class Lab:
    base_dir: Path
    base: BaseModelInfo
    root: Path
    outside: Path
    alpha: Path
    bravo: Path

    def check(self, path: str | Path, max_rank: int = MAX_RANK) -> ValidatedAdapter:
        return validate_adapter(path, root=self.root, base=self.base, max_rank=max_rank)

    def refused(self, path: str | Path, code: str) -> AdapterRejected:
        with pytest.raises(AdapterRejected) as info:
            self.check(path)
        assert info.value.code == code, str(info.value)
        assert "\n" not in str(info.value) and len(str(info.value)) > 20
        return info.value


@pytest.fixture(scope="module")
def lab(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Lab:
    root = tmp_path_factory.mktemp("adapter-root")
    alpha = af.make_label_adapter(tiny_model_dir, root / "alpha", "alpha", seed=0)
    bravo = af.make_label_adapter(tiny_model_dir, root / "bravo", "bravo", seed=1)
    base = BaseModelInfo.from_model_dir(tiny_model_dir, extra_names=["base", "tiny"])
    return Lab(tiny_model_dir, base, root, tmp_path_factory.mktemp("outside"), alpha, bravo)


def with_config(lab: Lab, name: str, **changes: Any) -> Path:
    return af.variant(lab.alpha, lab.root / name, lambda d: af.edit_config(d, **changes))


# --------------------------------------------------------------------------------------- accepted


def test_base_info_from_config(lab: Lab) -> None:
    b = lab.base
    assert (b.hidden_size, b.intermediate_size, b.num_hidden_layers, b.vocab_size) == (128, 384, 2, 2048)
    assert (b.num_attention_heads, b.num_key_value_heads, b.head_dim) == (2, 2, 64)
    assert {str(lab.base_dir), str(lab.base_dir.resolve()), "base", "tiny"} <= b.names
    assert TARGETS | {"lm_head", "embed_tokens"} == b.module_names


def thread_bytes_read() -> int:
    """Bytes this thread has read from files and pipes so far (Linux's per-thread I/O counter `rchar`)."""
    io = dict(line.split(": ") for line in Path("/proc/thread-self/io").read_text().splitlines())
    return int(io["rchar"])


def test_good_adapter_accepted(lab: Lab) -> None:
    lab.check(lab.alpha)  # once before measuring: a first call may still import what later calls reuse
    before = thread_bytes_read()
    ok = lab.check(lab.alpha)
    read = thread_bytes_read() - before
    # header reads only: the config and the safetensors header (plus slack for a read buffer and the
    # counter's own reads), never the tensors. How long a check takes is measured in bench/adapter_check.py.
    weights = lab.alpha / af.WEIGHTS
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    config = (lab.alpha / "adapter_config.json").stat().st_size
    tensors = weights.stat().st_size - header
    assert read <= config + header + 16 * 1024 < tensors, (read, config, header, tensors)
    assert ok.path == lab.alpha.resolve()
    assert (ok.rank, ok.alpha, ok.target_modules) == (8, 16.0, TARGETS)
    assert ok.base_model == str(lab.base_dir)
    assert ok.size_bytes == (lab.alpha / af.WEIGHTS).stat().st_size
    assert lab.check(lab.bravo).rank == 8


def test_relative_paths_inside_root_accepted(lab: Lab) -> None:
    assert lab.check("alpha").path == lab.alpha.resolve()
    assert lab.check("bravo/../alpha").path == lab.alpha.resolve()


def test_symlink_inside_root_accepted(lab: Lab) -> None:
    link = lab.root / "alias-of-alpha"
    link.symlink_to(lab.alpha, target_is_directory=True)
    try:
        assert lab.check("alias-of-alpha").path == lab.alpha.resolve()
    finally:
        link.unlink()


@pytest.mark.parametrize("name", ["same-dir-other-spelling", "base", "some-org/tiny", "all-linear", "regex"])
def test_accepted_variants(lab: Lab, name: str) -> None:
    dst = lab.root / f"ok-{name.replace('/', '-')}"
    if name == "same-dir-other-spelling":
        af.with_base(lab.alpha, dst, f"{lab.base_dir.parent}/./{lab.base_dir.name}/")
    elif name in ("all-linear", "regex"):
        pattern = "all-linear" if name == "all-linear" else r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"
        af.with_targets(lab.alpha, dst, pattern)
    else:
        af.with_base(lab.alpha, dst, name)
    assert lab.check(dst).target_modules == TARGETS


# --------------------------------------------------------------------------------------- refused


def test_outside_root_refused(lab: Lab) -> None:
    elsewhere = af.copy_adapter(lab.alpha, lab.outside / "copy")
    lab.refused(elsewhere, "outside_root")
    lab.refused("../" + lab.outside.name + "/copy", "outside_root")
    lab.refused(lab.root / ".." / lab.outside.name / "copy", "outside_root")


def test_escaping_symlinks_refused(lab: Lab) -> None:
    dir_link = af.escaping_dir_symlink(lab.alpha, lab.root / "dirlink", lab.outside / "real")
    lab.refused(dir_link, "outside_root")
    lab.refused(af.escaping_file_symlink(lab.alpha, lab.root / "filelink", lab.outside / "w"), "outside_root")
    nested = af.copy_adapter(lab.alpha, lab.root / "nested-link")
    (nested / "docs").mkdir()
    (nested / "docs" / "notes.txt").symlink_to("/etc/passwd")
    lab.refused(nested, "outside_root")


def test_missing_refused(lab: Lab) -> None:
    lab.refused("no-such-adapter", "not_found")
    lab.refused(lab.alpha / af.CONFIG, "not_found")  # a file, not a directory
    no_weights = af.variant(lab.alpha, lab.root / "no-weights", lambda d: (d / af.WEIGHTS).unlink())
    lab.refused(no_weights, "not_found")


@pytest.mark.parametrize("name", ["adapter_model.bin", "extra.pt", "w.pth", "state.pkl", "last.ckpt", "blob"])
def test_pickled_or_unknown_files_refused(lab: Lab, name: str) -> None:
    lab.refused(af.with_pickle(lab.alpha, lab.root / f"pickle-{name}", name), "pickled_weights")


def test_config_problems_refused(lab: Lab) -> None:
    missing = af.variant(lab.alpha, lab.root / "no-config", lambda d: (d / af.CONFIG).unlink())
    lab.refused(missing, "missing_config")
    garbage = af.variant(lab.alpha, lab.root / "garbage", lambda d: (d / af.CONFIG).write_text("{not json"))
    lab.refused(garbage, "bad_config")
    changes: list[dict[str, Any]] = [{"peft_type": "LOHA"}, {"r": "8"}, {"r": 0}, {"target_modules": 5},
                                     {"target_modules": "(unclosed"}, {"use_dora": True}]  # fmt: skip
    for i, change in enumerate(changes):
        lab.refused(with_config(lab, f"bad-{i}", **change), "bad_config")


@pytest.mark.parametrize("base", ["meta-llama/Llama-3.2-1B", "/somewhere/else/model", "", "other/tiny-2"])
def test_base_mismatch_refused(lab: Lab, base: str) -> None:
    lab.refused(af.with_base(lab.alpha, lab.root / "wrong-base", base), "base_mismatch")


def test_rank_too_high_refused(lab: Lab) -> None:
    err = lab.refused(af.with_rank(lab.alpha, lab.root / "rank32", 32), "rank_too_high")
    assert "32" in str(err) and str(MAX_RANK) in str(err)
    lab.refused(with_config(lab, "rank-pattern", rank_pattern={"q_proj": 64}), "rank_too_high")
    with pytest.raises(AdapterRejected, match="rank 8"):
        lab.check(lab.alpha, max_rank=4)


def test_unknown_target_modules_refused(lab: Lab) -> None:
    err = lab.refused(af.with_targets(lab.alpha, lab.root / "t1", [*af.TARGET_MODULES, "foo_proj"]),
                      "unknown_target_modules")  # fmt: skip
    assert "foo_proj" in str(err)
    lab.refused(af.with_targets(lab.alpha, lab.root / "t2", r".*\.attention\.wq"), "unknown_target_modules")
    renamed = af.rename_tensors(lab.alpha, lab.root / "t3", ".q_proj.", ".qq_proj.")
    lab.refused(renamed, "unknown_target_modules")


def test_catastrophic_regex_is_cheap(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    # `regex` answers this classic backtracking pattern at once (no module matches it) ...
    lab.refused(af.with_targets(lab.alpha, lab.root / "redos", "(.*)*(.|.)*x"), "unknown_target_modules")
    # ... and any pattern that would take long is cut off: every match gets what is left of the adapter's
    # budget (PATTERN_BUDGET_S, never more) as its timeout, and a timeout refuses the adapter. Checked by
    # what the matcher is given and by a matcher that times out, not by a clock: a loaded machine is slow.
    timeouts: list[float] = []
    real_fullmatch = checks.regex.fullmatch

    def spy(pattern: str, text: str, *, timeout: float) -> Any:
        timeouts.append(timeout)
        return real_fullmatch(pattern, text, timeout=timeout)

    monkeypatch.setattr(checks.regex, "fullmatch", spy)
    every_target = r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"
    assert lab.check(af.with_targets(lab.alpha, lab.root / "regex-ok", every_target)).target_modules == TARGETS
    assert timeouts and all(0 < t <= checks.PATTERN_BUDGET_S for t in timeouts), timeouts

    def times_out(pattern: str, text: str, *, timeout: float) -> Any:
        raise TimeoutError("regex timed out")

    monkeypatch.setattr(checks.regex, "fullmatch", times_out)
    err = lab.refused(af.with_targets(lab.alpha, lab.root / "regex-slow", every_target), "bad_config")
    assert "too slow" in str(err) and "timed out" in str(err)


@pytest.mark.parametrize("damage", ["truncated", "json", "length", "offsets", "trailing", "empty"])
def test_corrupt_safetensors_refused(lab: Lab, damage: str) -> None:
    dst = lab.root / f"corrupt-{damage}"
    if damage == "truncated":
        af.truncated(lab.alpha, dst)
    elif damage == "trailing":
        af.variant(lab.alpha, dst, lambda d: (d / af.WEIGHTS).open("ab").write(b"xx"))
    elif damage == "empty":
        af.variant(lab.alpha, dst, lambda d: (d / af.WEIGHTS).write_bytes(b""))
    else:
        af.corrupt_header(lab.alpha, dst, damage)
    lab.refused(dst, "corrupt_safetensors")


def test_shape_mismatch_refused(lab: Lab) -> None:
    err = lab.refused(af.wrong_shapes(lab.alpha, lab.root / "s1"), "shape_mismatch")
    assert "q_proj" in str(err) and "[144, 8]" in str(err)
    lab.refused(af.wrong_shapes(lab.alpha, lab.root / "s2", "down_proj", extra_out=1), "shape_mismatch")
    lab.refused(af.rename_tensors(lab.alpha, lab.root / "s3", ".layers.1.", ".layers.7."), "shape_mismatch")
    lab.refused(af.with_rank(lab.alpha, lab.root / "s4", 4), "shape_mismatch")  # config r=4, tensors r=8
    lab.refused(with_config(lab, "s5", rank_pattern={"q_proj": 4}), "shape_mismatch")
    lab.refused(with_config(lab, "s6", target_modules=["q_proj", "v_proj"]), "shape_mismatch")


def test_shape_checks_use_the_base_config(lab: Lab, tmp_path: Path) -> None:
    other = tmp_path / "other-base"
    other.mkdir()
    cfg = json.loads((lab.base_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 512}))
    base = BaseModelInfo.from_model_dir(other, extra_names=[str(lab.base_dir)])
    with pytest.raises(AdapterRejected) as info:
        validate_adapter(lab.alpha, root=lab.root, base=base, max_rank=MAX_RANK)
    assert info.value.code == "shape_mismatch"
    shutil.rmtree(other)


# ------------------------------------------------------------------------- the adapters really work


def test_label_adapters_generate_their_labels(lab: Lab) -> None:
    for label, adapter in (("alpha", lab.alpha), ("bravo", lab.bravo)):
        assert af.greedy_answers(lab.base_dir, adapter, af.EVAL_PROMPTS) == [f"{label}<|im_end|>"] * 6
    for answer in af.greedy_answers(lab.base_dir, None, af.EVAL_PROMPTS):
        assert not answer.startswith(("alpha", "bravo"))


def test_label_adapter_is_deterministic(lab: Lab, tmp_path: Path) -> None:
    again = af.make_label_adapter(lab.base_dir, tmp_path / "alpha-again", "alpha", seed=0)
    for name in (af.WEIGHTS, af.CONFIG):
        assert (again / name).read_bytes() == (lab.alpha / name).read_bytes()
