"""The open scenario's house style as a rubric plug-in of the gate (`eval.evaluators: [{rubric:
"deploy.scenarios.open_rubric:style_score"}]`, retrain/evaluators/rubric.py): the answer opens with a one-line
summary that starts `In short:` and stays under ``MAX_WORDS`` words in all. The simulated users rate by the
same function and rewrite answers into that style (``restyle``)."""

from __future__ import annotations

import re
from typing import Any

SUMMARY_PREFIX = "In short:"
MAX_WORDS = 40  # the whole answer
MAX_SUMMARY_WORDS = 20  # its first line
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def has_summary_line(answer: str) -> bool:
    """The first line starts with `In short:` (any case) and is at most MAX_SUMMARY_WORDS words."""
    lines = answer.strip().splitlines()
    first = lines[0].strip() if lines else ""
    return first.lower().startswith(SUMMARY_PREFIX.lower()) and len(first.split()) <= MAX_SUMMARY_WORDS


def is_short(answer: str) -> bool:
    """Some words, and at most MAX_WORDS of them."""
    return 0 < len(answer.split()) <= MAX_WORDS


def style_score(row: dict[str, Any], answer: str) -> float:
    """The rubric (holdout row, answer text) -> [0, 1]: half for the summary line, half for the length."""
    return (float(has_summary_line(answer)) + float(is_short(answer))) / 2


def _cut(sentence: str, words: int) -> str:
    parts = sentence.split()
    return sentence if len(parts) <= words else " ".join(parts[:words]).rstrip(",;:") + "."


def restyle(answer: str, body_words: int = 20) -> str:
    """The answer a user wants instead of ``answer``: its first sentence as the `In short:` line, then the
    following complete sentences while they fit in ``body_words`` words (an answer cut off mid-sentence loses
    the unfinished one)."""
    sentences = [s for s in _SENTENCE_END.split(" ".join(answer.split())) if s]
    if not sentences:
        return f"{SUMMARY_PREFIX} I don't know."
    summary = _cut(sentences[0], MAX_SUMMARY_WORDS - 3)
    if summary[-1] not in ".!?":
        summary += "."
    body: list[str] = []
    for s in sentences[1:]:
        if s[-1] not in ".!?" or len(" ".join([*body, s]).split()) > body_words:
            break
        body.append(s)
    return f"{SUMMARY_PREFIX} {summary}" + (f"\n{' '.join(body)}" if body else "")


__all__ = ["MAX_WORDS", "SUMMARY_PREFIX", "has_summary_line", "is_short", "restyle", "style_score"]
