"""Cleaning: encoding repair, empty / failed / cut-off answers (``clean_rows``, first stage) and
token-length limits (``check_lengths``, run after PII scrubbing and dedupe on the final text).

A dropped row is counted under the first reason that applies, in this order: ``broken_encoding``,
``empty_prompt``, ``empty_answer``, ``identical_pair``, ``error_response``, ``truncated``,
``unfinished_sentence``; then ``template_error``, ``prompt_too_long``, ``answer_too_long``.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Any

from retrain.config import CleaningConfig
from retrain.data.formatting import Formatter, TemplateDropsToolCalls
from retrain.data.sources import ANSWER_FIELDS, answer_texts, map_texts, row_texts

# Lone surrogates, U+FFFD and control characters other than tab, newline and carriage return.
_BROKEN = re.compile(r"[\ud800-\udfff\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# UTF-8 read as Latin-1 / Windows-1252 ('Ã©', 'Â ', 'â€”'): the fallback detector when ftfy is missing.
_MOJIBAKE = re.compile(r"[ÃÂ][\u00a0-\u00bf]|â€[\u0080-\u00bf\u2018-\u201e\u2020-\u2122\u0152-\u0178]")


def _ftfy_fixer() -> Any:
    try:
        import ftfy
    except ImportError:
        return None
    config = ftfy.TextFixerConfig(
        unescape_html=False, remove_terminal_escapes=False, uncurl_quotes=False, fix_latin_ligatures=False,
        fix_character_width=False, fix_line_breaks=False, remove_control_chars=False, normalization=None,
        explain=False,
    )  # fmt: skip
    return lambda text: ftfy.fix_text(text, config)


class EncodingRepair:
    """Repairs mojibake with ftfy (when installed) and says whether text is still broken."""

    def __init__(self, repair: bool) -> None:
        self.fix = _ftfy_fixer() if repair else None
        self.detect_only = self.fix is None
        self.repaired = 0

    def __call__(self, text: str) -> str:
        if self.fix is None or text.isascii():
            return text
        try:
            fixed: str = self.fix(text)
        except Exception:  # never let the repair crash the run: the broken-text check still applies
            return text
        if fixed != text:
            self.repaired += 1
        return fixed

    def broken(self, text: str) -> bool:
        return bool(_BROKEN.search(text) or (self.detect_only and _MOJIBAKE.search(text)))


def ends_mid_sentence(text: str) -> bool:
    """True when an answer seems cut in the middle of a sentence: it ends with a letter, a comma, a dash or
    an opening bracket, and has more than three words (short answers such as 'Yes' or 'Paris' pass)."""
    end = text.rstrip()
    if not end or len(end.split()) <= 3 or end.endswith("```"):
        return False
    last = end[-1]
    return last in ",-–—(/[{" or unicodedata.category(last) in ("Ps", "Pd", "Pi") or last.isalpha()


def _flag(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("1", "true", "yes"))


def _failed(row: dict[str, Any], cfg: CleaningConfig) -> str | None:
    """Why a model answer must not be trained on (error or cut-off), for rows that carry those fields."""
    if row.get("origin") == "correction":
        return None  # the answer was written by a person; the request's own outcome does not matter
    for prefix in ("", "chosen_"):
        status, error = row.get(f"{prefix}status"), row.get(f"{prefix}error")
        bad_status = isinstance(status, int | float) and status >= 400
        if cfg.drop_errors and (bad_status or (isinstance(error, str) and error.strip())):
            return "error_response"
        finish = row.get(f"{prefix}finish_reason")
        if cfg.drop_truncated and (finish == "length" or _flag(row.get(f"{prefix}truncated"))):
            return "truncated"
    if cfg.drop_truncated and _flag(row["metadata"].get("truncated")):
        return "truncated"
    return None


def _first_reason(row: dict[str, Any], fixer: EncodingRepair, cfg: CleaningConfig) -> str | None:
    if any(fixer.broken(t) for t in row_texts(row)):
        return "broken_encoding"
    prompts = [m["content"] for m in row["messages"]] if row.get("messages") else [row.get("prompt") or ""]
    if not any(p.strip() for p in prompts):
        return "empty_prompt"
    answers = answer_texts(row)
    if not all(a.strip() for a in answers):
        return "empty_answer"
    if len(answers) == 2 and answers[0].strip() == answers[1].strip():
        return "identical_pair"
    failed = _failed(row, cfg)
    if failed:
        return failed
    if cfg.drop_unfinished_sentences and ends_mid_sentence(answers[0]):
        return "unfinished_sentence"
    return None


def clean_rows(
    rows: list[dict[str, Any]], cfg: CleaningConfig
) -> tuple[list[dict[str, Any]], Counter[str], dict[str, Any]]:
    """Kept rows (with repaired text), drop counts by reason, and notes: the text checks (encoding,
    empty, identical, error, truncated, unfinished). Token limits are :func:`check_lengths`."""
    dropped: Counter[str] = Counter()
    if not cfg.enabled:
        return list(rows), dropped, {"enabled": False}
    fixer = EncodingRepair(cfg.repair_encoding)
    kept: list[dict[str, Any]] = []
    for row in rows:
        fixed = map_texts(row, fixer)
        reason = _first_reason(fixed, fixer, cfg)
        if reason:
            dropped[reason] += 1
        else:
            kept.append(fixed)
    return kept, dropped, {"texts_repaired": fixer.repaired, "ftfy": not fixer.detect_only}


def _over(tokenizer: Any, texts: list[str], limit: int, extra: int = 0) -> list[bool]:
    """Whether each text has more than ``limit`` tokens. A token covers at least one UTF-8 byte, so only
    texts longer than ``limit - 4`` bytes are tokenised (the margin covers added prefix-space markers)."""
    out = [False] * len(texts)
    todo = [i for i, t in enumerate(texts) if len(t.encode("utf-8")) + 4 + extra > limit]
    if todo:
        ids = tokenizer([texts[i] for i in todo], add_special_tokens=False)["input_ids"]
        for i, seq in zip(todo, ids, strict=True):
            out[i] = len(seq) + extra > limit
    return out


def check_lengths(
    rows: list[dict[str, Any]], cfg: CleaningConfig, formatter: Formatter
) -> tuple[list[dict[str, Any]], Counter[str], dict[str, Any]]:
    """Rows whose chat template renders and whose prompt / answers fit the token limits.

    The prompt is counted as rendered (generation prompt and the tokenizer's own BOS included), each
    answer as rendered after it (end-of-turn included). Reasons: ``template_error``,
    ``prompt_too_long``, ``answer_too_long``.
    """
    dropped: Counter[str] = Counter()
    if not cfg.enabled:
        return list(rows), dropped, {"enabled": False}
    rendered: list[tuple[dict[str, Any], str, list[str]]] = []
    for row in rows:
        try:
            prompt = formatter.prompt(row)
            answers = [formatter.answer(row, prompt, f) for f in ANSWER_FIELDS[row.get("kind", "sft")]]
        except TemplateDropsToolCalls:
            raise  # the recipe's template is wrong for this data: every tool-call row would be lost
        except Exception:  # jinja errors, role-alternation checks of some templates
            dropped["template_error"] += 1
            continue
        rendered.append((row, prompt, answers))
    bos = 1 if formatter.bos_id is not None else 0
    tok = formatter.tokenizer
    long_prompt = _over(tok, [p for _, p, _ in rendered], cfg.max_prompt_tokens, bos)
    flat = [a for _, _, answers in rendered for a in answers]
    long_answer = iter(_over(tok, flat, cfg.max_answer_tokens))
    kept: list[dict[str, Any]] = []
    for (row, _, answers), too_long in zip(rendered, long_prompt, strict=True):
        answer_over = any([next(long_answer) for _ in answers])
        if too_long:
            dropped["prompt_too_long"] += 1
        elif answer_over:
            dropped["answer_too_long"] += 1
        else:
            kept.append(row)
    notes = {"max_prompt_tokens": cfg.max_prompt_tokens, "max_answer_tokens": cfg.max_answer_tokens}
    return kept, dropped, notes


__all__ = ["EncodingRepair", "check_lengths", "clean_rows", "ends_mid_sentence"]
