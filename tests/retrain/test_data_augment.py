"""Augmentation: marked variants, real techniques, graceful gateway failures, never in validation/holdout."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from retrain.config import AugmentConfig, DataConfig, PIIConfig
from retrain.data import prepare
from retrain.data.augment import augment_rows, case_punctuation_variant, template_variant
from retrain.data.pii import Scrubber
from retrain.data.sources import normalize_rows


def chat_rows(n: int, lang: str | None = None) -> list[dict[str, Any]]:
    rows = [
        {
            "row_id": f"r{i:03d}",
            "messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": f"How do I fix error {i}?"},
            ],
            "completion": f"Restart the service {i} times.",
            "request_id": f"q{i}",
            "metadata": {"lang": lang} if lang else {},
        }
        for i in range(n)
    ]
    return normalize_rows(rows, "sft")[0]


def test_variants_keep_the_meaning() -> None:
    assert template_variant(" Fix it ", ["Question: {text}"], 7) == "Question: Fix it"
    variants = {case_punctuation_variant("How do I fix it?", k) for k in range(3)}
    assert variants == {"how do I fix it?", "How do I fix it", "how do I fix it"}
    assert case_punctuation_variant("Restart now", 1) == "Restart now."
    assert case_punctuation_variant("what now", 1) == "what now?"


def test_template_and_case_rows_are_marked() -> None:
    rows = (
        chat_rows(50) + normalize_rows([{"row_id": "text", "prompt": "Once upon", "completion": " a time"}], "sft")[0]
    )
    cfg = AugmentConfig(enabled=True, techniques=["templates", "case_punctuation"], ratio=0.2)
    made, notes = augment_rows(rows, cfg, seed=0)
    assert len(made) == 2 * round(0.2 * 51)
    assert notes["templates"]["made"] == 10 and notes["templates"]["skipped_not_chat"] == 1
    sources = {r["row_id"]: r for r in rows}
    for row in made:
        src = sources[row["source_row_id"]]
        assert row["augmented"] is True and row["augmentation"] in ("templates", "case_punctuation")
        assert row["row_id"] == f"{src['row_id']}#aug-{row['augmentation']}"
        assert row["messages"][0] == src["messages"][0]  # only the last user message changes
        assert row["messages"][1]["content"] != src["messages"][1]["content"]
        assert row["completion"] == src["completion"] and row["request_id"] == src["request_id"]
        if row["augmentation"] == "templates":
            assert src["messages"][1]["content"] in row["messages"][1]["content"]
    assert made == augment_rows(rows, cfg, seed=0)[0]  # deterministic
    assert made != augment_rows(rows, cfg, seed=1)[0]


def test_templates_skip_other_languages() -> None:
    made, notes = augment_rows(chat_rows(20, lang="fr"), AugmentConfig(enabled=True, ratio=0.5), seed=0)
    assert made == [] and notes["templates"]["skipped_language"] == 20


def test_paraphrase_with_a_model_scrubbed_and_failures_stop_it() -> None:
    cfg = AugmentConfig(enabled=True, techniques=["paraphrase"], ratio=0.5)
    scrub = Scrubber(PIIConfig())
    made, notes = augment_rows(
        chat_rows(10),
        cfg,
        seed=0,
        scrub=scrub,
        paraphraser=lambda text: f"Please tell me, {text.lower()} Mail me at a@b.io",
    )
    assert len(made) == 5 and notes["paraphrase"]["made"] == 5
    assert all(r["augmentation"] == "paraphrase" and r["messages"][-1]["content"].endswith("<EMAIL>") for r in made)
    calls: list[str] = []

    def flaky(text: str) -> str:
        calls.append(text)
        raise ConnectionError("gateway down")

    made, notes = augment_rows(chat_rows(10), cfg, seed=0, paraphraser=flaky)
    assert made == [] and len(calls) == 1 and "gateway down" in notes["paraphrase_error"]
    made, notes = augment_rows(chat_rows(10), cfg, seed=0, paraphraser=lambda text: text)  # no change: rejected
    assert made == [] and notes["paraphrase"]["rejected_variant"] == 5


def test_unconfigured_or_unreachable_gateway_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    made, notes = augment_rows(chat_rows(4), AugmentConfig(enabled=True, techniques=["paraphrase"]), seed=0)
    assert made == [] and "not configured" in notes["paraphrase"]["skipped"]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = AugmentConfig(
        enabled=True,
        techniques=["paraphrase"],
        ratio=1.0,
        paraphrase={"base_url": f"http://127.0.0.1:{port}/v1", "alias": "tiny", "timeout_s": 5},
    )
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        made, notes = augment_rows(chat_rows(4), cfg, seed=0)
    assert made == [] and "paraphrase_error" in notes and time.monotonic() - started < 10
    assert "paraphrase" in caplog.text


def test_augmented_rows_only_in_train(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [
        {
            "row_id": f"r{i:03d}",
            "messages": [{"role": "user", "content": f"Topic {i}: how does it work?"}],
            "completion": f"It works in way number {i}.",
            "request_id": f"q{i}",
        }
        for i in range(120)
    ]
    cfg = DataConfig(
        min_rows=0,
        augment={
            "enabled": True,
            "techniques": ["templates", "case_punctuation"],
            "ratio": 0.3,
            "kinds": ["sft", "pairs"],
        },
        splits={"validation": 0.2, "holdout": 0.2, "folds": 3},
    )
    out = prepare(cfg, rows, [], tok, seed=0)
    train, val, hold = out.sft["train"], out.sft["validation"], out.sft["holdout"]
    augmented = [r for r in train if r["augmented"]]
    originals = [r for r in train if not r["augmented"]]
    assert len(augmented) == 2 * round(0.3 * len(originals))
    assert not any(r["augmented"] for r in val + hold)
    held_prompts = {r["prompt"] for r in val + hold}
    assert not held_prompts & {r["prompt"] for r in augmented}
    by_id = {r["row_id"]: r for r in originals}
    assert all(r["fold"] == by_id[r["row_id"].split("#")[0]]["fold"] for r in augmented)
    _, fold_eval = out.fold("sft", 0)
    assert not any(r["augmented"] for r in fold_eval)
    assert next(s for s in out.stats if s.stage == "sft:augment").notes["made"] == len(augmented)
