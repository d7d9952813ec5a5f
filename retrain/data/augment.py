"""Optional augmentation of training rows: prompt variants that keep the meaning (off by default).

Techniques (each gives at most one variant of a chosen row; ``ratio`` x rows are chosen by
sha256(seed, technique, row_id)):

* ``templates``: the last user message wrapped in an instruction template ("Question: {text}").
  English rows only (rows whose ``lang`` is set to something else are skipped).
* ``case_punctuation``: the first letter's case flipped and/or the final punctuation removed/added.
* ``paraphrase``: the served model rewrites the last user message through the gateway's OpenAI API
  (``openai`` client); skipped with a logged reason when not configured or unreachable.

Only chat rows are augmented (completions prompts are continuation text, rewording changes the
task). A variant keeps the source's request id, split key, split and fold, and is marked
``augmented: True``, ``augmentation: <technique>``, ``source_row_id``; the pipeline only augments
the training split, so variants never reach validation or holdout.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from retrain.config import AugmentConfig, ParaphraseConfig
from retrain.data.balance import attribute_value
from retrain.data.dedupe import normalize_text

Paraphraser = Callable[[str], str | None]
PARAPHRASE_SYSTEM = (
    "Rewrite the user's message with different wording but exactly the same meaning, in the same language. "
    "Keep placeholders such as <EMAIL> unchanged. Reply with the rewritten message only."
)
_QUESTION_WORDS = ("what", "why", "how", "when", "where", "who", "which", "can", "could", "is", "are", "do", "does")


def _rank(seed: int, technique: str, row_id: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{technique}\x00{row_id}".encode()).digest()


def last_user_index(messages: list[dict[str, Any]] | None) -> int | None:
    """Index of the last user message with text, else None."""
    for i in range(len(messages or []) - 1, -1, -1):
        m = (messages or [])[i]
        if m.get("role") == "user" and str(m.get("content") or "").strip():
            return i
    return None


def template_variant(text: str, templates: list[str], pick: int) -> str:
    """``text`` in the template chosen by ``pick``."""
    return templates[pick % len(templates)].replace("{text}", text.strip())


def case_punctuation_variant(text: str, pick: int) -> str:
    """The first letter's case flipped, the final punctuation changed, or both (chosen by ``pick``)."""
    body = text.strip()
    if not body:
        return text

    def flip_case(s: str) -> str:
        first = s[0]
        return (first.lower() if first.isupper() else first.upper()) + s[1:]

    def punctuation(s: str) -> str:
        if s[-1] in ".?!":
            return s[:-1].rstrip() or s
        question = s.split()[0].lower().strip(",:") in _QUESTION_WORDS
        return s + ("?" if question else ".")

    options = [flip_case, punctuation, lambda s: punctuation(flip_case(s))]
    for k in range(len(options)):
        variant = options[(pick + k) % len(options)](body)
        if variant != body:
            return variant
    return text


def gateway_paraphraser(cfg: ParaphraseConfig) -> tuple[Paraphraser | None, str]:
    """A paraphrase function calling the gateway, or (None, why not)."""
    if not cfg.base_url or not cfg.alias:
        return None, "paraphrase.base_url / paraphrase.alias not configured"
    try:
        from openai import OpenAI
    except ImportError:
        return None, "the openai package is not installed"
    key = cfg.api_key.get_secret_value() if cfg.api_key else "none"
    client = OpenAI(base_url=cfg.base_url, api_key=key, timeout=cfg.timeout_s, max_retries=0)
    model = cfg.alias

    def paraphrase(text: str) -> str | None:
        resp = client.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": PARAPHRASE_SYSTEM}, {"role": "user", "content": text}],
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
            user="loraloop-augment",
        )
        return resp.choices[0].message.content if resp.choices else None

    return paraphrase, ""


def _acceptable(original: str, variant: str | None, technique: str) -> bool:
    if not variant or not variant.strip() or variant.strip() == original.strip():
        return False
    if technique == "paraphrase" and normalize_text(variant) == normalize_text(original):
        return False  # the model only changed case or spacing: not a paraphrase
    return len(variant) <= 3 * len(original) + 200


def augment_rows(
    rows: list[dict[str, Any]],
    cfg: AugmentConfig,
    *,
    seed: int,
    missing: str = "unknown",
    paraphraser: Paraphraser | None = None,
    scrub: Callable[[str], str] | None = None,
    log: logging.Logger | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """New augmented rows (the originals are not included) and notes per technique.

    ``paraphraser`` overrides the gateway client (tests); ``scrub`` is applied to model paraphrases.
    """
    log = log or logging.getLogger(__name__)
    notes: dict[str, Any] = {}
    originals = [r for r in rows if not r.get("augmented") and not r.get("resampled")]
    chat = [r for r in originals if last_user_index(r.get("messages")) is not None]
    out: list[dict[str, Any]] = []
    for technique in cfg.techniques:
        stats: Counter[str] = Counter(skipped_not_chat=len(originals) - len(chat))
        candidates = chat
        if technique == "templates":
            candidates = [r for r in chat if attribute_value(r, "lang", missing) in (missing, "en")]
            stats["skipped_language"] = len(chat) - len(candidates)
        want = min(len(candidates), round(cfg.ratio * len(originals)))
        chosen = sorted(candidates, key=lambda r: _rank(seed, technique, r["row_id"]))[:want]
        fn: Paraphraser | None = None
        if technique == "paraphrase":
            fn, why = (paraphraser, "") if paraphraser else gateway_paraphraser(cfg.paraphrase)
            chosen = chosen[: cfg.paraphrase.max_rows]
            if fn is None:
                log.warning("augmentation 'paraphrase' skipped: %s", why)
                notes[technique] = {"skipped": why}
                continue
        for row in chosen:
            messages = [dict(m) for m in row["messages"]]
            idx = last_user_index(messages)
            assert idx is not None
            text = str(messages[idx]["content"])
            pick = _rank(seed, technique + ":pick", row["row_id"])[0]
            if technique == "templates":
                variant: str | None = template_variant(text, cfg.templates, pick)
            elif technique == "case_punctuation":
                variant = case_punctuation_variant(text, pick)
            else:
                assert fn is not None
                try:
                    variant = fn(text)
                except Exception as exc:  # unreachable gateway, HTTP errors: stop this technique
                    why = f"gateway call failed: {type(exc).__name__}: {exc}"
                    log.warning("augmentation 'paraphrase' stopped after %d rows: %s", stats["made"], why)
                    stats["stopped"] = 1
                    notes["paraphrase_error"] = why
                    break
                variant = scrub(variant.strip()) if variant and scrub else variant
            if not _acceptable(text, variant, technique):
                stats["rejected_variant"] += 1
                continue
            messages[idx]["content"] = variant
            out.append(
                {**row, "messages": messages, "row_id": f"{row['row_id']}#aug-{technique}", "augmented": True,
                 "augmentation": technique, "source_row_id": row["row_id"], "resampled": False}
            )  # fmt: skip
            stats["made"] += 1
        notes[technique] = dict(stats)
    return out, notes


__all__ = [
    "PARAPHRASE_SYSTEM",
    "augment_rows",
    "case_punctuation_variant",
    "gateway_paraphraser",
    "last_user_index",
    "template_variant",
]
