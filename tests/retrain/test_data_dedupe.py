"""Exact and near-duplicate removal, and which row of a group survives."""

from __future__ import annotations

from typing import Any

from retrain.config import DedupeConfig
from retrain.data.dedupe import dedupe_rows
from retrain.data.sources import normalize_rows

Q = "My order arrived late and the box was damaged, what can I do about it?"
A = (
    "We are sorry about that. Please reply with your order number and a photo of the box, and we will send a "
    "replacement or refund you within three business days."
)


def row(i: int, q: str = Q, a: str = A, origin: str = "rated_good", at: int | None = None) -> dict[str, Any]:
    return {
        "row_id": f"r{i:02d}",
        "origin": origin,
        "messages": [{"role": "user", "content": q}],
        "completion": a,
        "request_id": f"q{i}",
        "available_at": f"2026-01-01T00:00:{at if at is not None else i:02d}",
    }


def dedupe(rows: list[dict[str, Any]], kind: str = "sft", **cfg: Any) -> tuple[list[str], dict[str, int]]:
    norm, _ = normalize_rows(rows, kind)
    kept, dropped, _ = dedupe_rows(norm, DedupeConfig(**cfg))
    return [r["row_id"] for r in kept], dict(dropped)


def test_exact_duplicates_after_normalisation() -> None:
    rows = [row(0), row(1, q=Q.upper()), row(2, a="  " + A.replace(" ", "\n  ")), row(3, q="Something else entirely?")]
    assert dedupe(rows, near=False) == (["r00", "r03"], {"exact_duplicate": 2})


def test_near_duplicates_one_word_changed() -> None:
    rows = [
        row(0),
        row(1, a=A.replace("photo", "picture")),  # one word changed
        row(2, q=Q.replace("late", "early")),  # one word changed in the prompt
        row(3, q="How do I reset my password?", a="Open Settings, then Security, then choose Reset password."),
        row(4, q="How do I change my e-mail address?", a="Open Settings, then Account, then choose Change e-mail."),
    ]
    assert dedupe(rows) == (["r00", "r03", "r04"], {"near_duplicate": 2})
    assert dedupe(rows, near=False) == (["r00", "r01", "r02", "r03", "r04"], {})
    # a stricter threshold keeps the one-word variants
    assert dedupe(rows, threshold=0.95)[1] == {}


def test_keep_strongest_or_earliest() -> None:
    rows = [row(0, origin="rated_good", at=1), row(1, origin="correction", at=5), row(2, origin="seed", at=0)]
    # strongest signal: the correction wins although it is the latest
    assert dedupe(rows) == (["r01"], {"exact_duplicate": 2})
    assert dedupe(rows, keep="earliest") == (["r02"], {"exact_duplicate": 2})
    assert dedupe(rows, origin_priority=["seed"]) == (["r02"], {"exact_duplicate": 2})


def test_pairs_compare_prompt_chosen_and_rejected() -> None:
    pairs = [
        {"row_id": "p0", "prompt": "Translate 'chat'", "chosen": "cat", "rejected": "dog"},
        {"row_id": "p1", "prompt": "Translate 'chat'", "chosen": "cat", "rejected": "dog"},
        {"row_id": "p2", "prompt": "Translate 'chat'", "chosen": "cat", "rejected": "talk"},
    ]
    assert dedupe(pairs, "pairs") == (["p0", "p2"], {"exact_duplicate": 1})


def test_input_order_does_not_matter() -> None:
    rows = [row(i, q=f"{Q} (case {i % 7})") for i in range(30)]
    exact = dedupe(rows, near=False)
    assert exact == dedupe(list(reversed(rows)), near=False)
    assert exact[0] == [f"r{i:02d}" for i in range(7)]  # the earliest of each exact group
    near = dedupe(rows)  # the 7 groups differ by one word: near-duplicates of each other
    assert near == dedupe(list(reversed(rows))) == (["r00"], {"exact_duplicate": 23, "near_duplicate": 6})
