"""Cleaning: broken encodings, empty / failed / cut-off answers, token limits, unusable rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from retrain.config import CleaningConfig
from retrain.data.cleaning import check_lengths, clean_rows, ends_mid_sentence
from retrain.data.formatting import Formatter
from retrain.data.sources import normalize_rows


def row(i: int, prompt: str = "What is the capital of France?", answer: str = "Paris.", **kw: Any) -> dict[str, Any]:
    return {
        "row_id": f"r{i}",
        "origin": "rated_good",
        "messages": [{"role": "user", "content": prompt}],
        "completion": answer,
        "request_id": f"q{i}",
        "available_at": f"2026-01-01T00:00:{i:02d}",
        **kw,
    }


def clean(rows: list[dict[str, Any]], kind: str = "sft", **cfg: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
    norm, _ = normalize_rows(rows, kind)
    kept, dropped, _ = clean_rows(norm, CleaningConfig(**cfg))
    return kept, dict(dropped)


def test_encoding_repaired_or_dropped() -> None:
    rows = [
        row(0, "Quel est le cafÃ© le plus proche ?", "Le cafÃ© est Ã  droite."),  # mojibake: repaired
        row(1, "Broken \ufffd char", "ok."),  # replacement character: information is lost
        row(2, "lone \ud800 surrogate", "ok."),
        row(3, "bell \x07 control", "ok."),
        row(4, "fine", "answer with an escape \x1b[31m code"),
        row(5, "Tab\tand newline\nare fine", "Yes.\r\n"),
        row(6, "Wait\x85 what", "ok."),  # a C1 control from Windows-1252 text: ftfy reads it as '…'
    ]
    kept, dropped = clean(rows)
    assert dropped == {"broken_encoding": 4}
    assert [r["row_id"] for r in kept] == ["r0", "r5", "r6"]
    assert kept[0]["messages"][0]["content"] == "Quel est le café le plus proche ?"
    assert kept[0]["completion"] == "Le café est à droite."
    assert kept[2]["messages"][0]["content"] == "Wait… what"


def test_mojibake_dropped_when_repair_is_off() -> None:
    kept, dropped = clean([row(0, "cafÃ©"), row(1, "café")], repair_encoding=False)
    assert dropped == {"broken_encoding": 1}
    assert kept[0]["messages"][0]["content"] == "café"


def test_empty_answers_prompts_and_identical_pairs() -> None:
    rows = [row(0, answer=""), row(1, answer="  \n\t "), row(2, prompt="   "), row(3)]
    kept, dropped = clean(rows)
    assert dropped == {"empty_answer": 2, "empty_prompt": 1}
    assert [r["row_id"] for r in kept] == ["r3"]
    pairs = [
        {"row_id": "p0", "prompt": "Say hi", "chosen": "Hi!", "rejected": " Hi! "},
        {"row_id": "p1", "prompt": "Say hi", "chosen": "Hi!", "rejected": ""},
        {"row_id": "p2", "prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away."},
    ]
    kept, dropped = clean(pairs, "pairs")
    assert dropped == {"identical_pair": 1, "empty_answer": 1}
    assert [r["row_id"] for r in kept] == ["p2"]


def test_error_and_cut_off_rows() -> None:
    rows = [
        row(0, status=500),
        row(1, error="upstream timeout"),
        row(2, finish_reason="length"),
        row(3, metadata={"truncated": True}),
        row(4, status=200, finish_reason="stop", error=None),
        row(5, origin="correction", finish_reason="length"),  # a person wrote the answer: kept
    ]
    kept, dropped = clean(rows)
    assert dropped == {"error_response": 2, "truncated": 2}
    assert [r["row_id"] for r in kept] == ["r4", "r5"]
    kept, dropped = clean(rows, drop_errors=False, drop_truncated=False)
    assert len(kept) == 6 and dropped == {}


def test_unfinished_sentences_only_when_flagged() -> None:
    rows = [row(0, answer="The capital of France is Paris, and it is"), row(1, answer="Yes"), row(2)]
    assert clean(rows)[1] == {}
    _, dropped = clean(rows, drop_unfinished_sentences=True)
    assert dropped == {"unfinished_sentence": 1}
    assert ends_mid_sentence("It works like this:\n```\ncode\n```") is False
    assert ends_mid_sentence("The total is 42") is False


def test_unusable_rows_are_counted_at_load() -> None:
    rows = [
        {"row_id": "a", "completion": "no prompt"},
        {"row_id": "b", "messages": [{"role": "user", "content": [{"type": "image_url"}]}], "completion": "x"},
        {"row_id": "c", "messages": '[{"role": "user", "content": "json string"}]', "completion": "ok"},
        {
            "row_id": "d",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}]}],
            "completion": "ok",
        },
    ]
    norm, dropped = normalize_rows(rows, "sft")
    assert dropped == {"invalid_row": 2}
    assert [r["messages"][0]["content"] for r in norm] == ["json string", "parts"]


@pytest.fixture(scope="module")
def formatter(tiny_model_dir: Path) -> Formatter:
    from transformers import AutoTokenizer

    return Formatter(AutoTokenizer.from_pretrained(tiny_model_dir))


def test_token_limits(formatter: Formatter) -> None:
    long_text = " ".join(["word"] * 400)
    rows = [row(0), row(1, prompt=long_text), row(2, answer=long_text)]
    norm, _ = normalize_rows(rows, "sft")
    cfg = CleaningConfig(max_prompt_tokens=100, max_answer_tokens=100)
    kept, dropped, _ = check_lengths(norm, cfg, formatter)
    assert dict(dropped) == {"prompt_too_long": 1, "answer_too_long": 1}
    assert [r["row_id"] for r in kept] == ["r0"]
    # the bound is on tokens of the rendered prompt: a tight limit drops the short row too
    n_tokens = len(formatter.tokenizer(formatter.prompt(norm[0]), add_special_tokens=False)["input_ids"])
    tight = CleaningConfig(max_prompt_tokens=n_tokens - 1)
    assert dict(check_lengths(norm[:1], tight, formatter)[1]) == {"prompt_too_long": 1}
    assert check_lengths(norm[:1], CleaningConfig(max_prompt_tokens=n_tokens), formatter)[0] == norm[:1]
