"""Exact and near-duplicate removal.

The compared text is the prompt plus the answer (SFT) or the prompt plus chosen plus rejected
(pairs), normalised: NFKC, case-folded, whitespace collapsed. Exact duplicates share the sha256 of
that text; near-duplicates have a MinHash (``datasketch``) Jaccard estimate of their word (or
character) shingles at or above the threshold. Rows are visited from the one to keep first (see
``DedupeConfig.keep``), so the survivor of every group is the strongest (or earliest) row.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections import Counter
from typing import Any

from retrain.config import DedupeConfig
from retrain.data.sources import answer_texts, prompt_text

_SPACE = re.compile(r"\s+")
_WORD = re.compile(rb"(?:\w|[\x80-\xff])+")


def normalize_text(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed and stripped."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def prompt_key(row: dict[str, Any]) -> str:
    """sha256 of the normalised prompt (roles included for chat rows)."""
    return hashlib.sha256(normalize_text(prompt_text(row)).encode("utf-8")).hexdigest()


def dedupe_text(row: dict[str, Any]) -> str:
    """The normalised text that duplicates are judged on."""
    return "\x1f".join(normalize_text(t) for t in [prompt_text(row), *answer_texts(row)])


def shingles(text: str, size: int, unit: str) -> set[bytes]:
    """Word (or character) n-grams of a normalised text as UTF-8 bytes; the whole text when it is shorter
    than one n-gram. Words are runs of ASCII word characters and non-ASCII characters."""
    data = text.encode("utf-8")
    if unit == "char":
        units = list(text)
        if len(units) <= size:
            return {data}
        return {"".join(units[i : i + size]).encode("utf-8") for i in range(len(units) - size + 1)}
    words = _WORD.findall(data)
    if not words:  # no word at all (punctuation only): fall back to characters
        return shingles(text, size, "char")
    if len(words) <= size:
        return {b" ".join(words)}
    return {b" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def keep_order(rows: list[dict[str, Any]], cfg: DedupeConfig) -> list[int]:
    """Row indices from the one to keep first to the one to drop first."""
    rank = {origin: i for i, origin in enumerate(cfg.origin_priority)}

    def key(i: int) -> tuple[Any, ...]:
        row = rows[i]
        base = (row.get("available_at") or "", row["row_id"])
        if cfg.keep == "strongest":
            return (rank.get(row.get("origin") or "", len(rank)), *base)
        return base

    return sorted(range(len(rows)), key=key)


def dedupe_rows(
    rows: list[dict[str, Any]], cfg: DedupeConfig
) -> tuple[list[dict[str, Any]], Counter[str], dict[str, Any]]:
    """Rows without duplicates (input order kept), drop counts (`exact_duplicate`, `near_duplicate`), notes."""
    dropped: Counter[str] = Counter()
    notes: dict[str, Any] = {"keep": cfg.keep}
    texts = [dedupe_text(r) for r in rows]
    order = keep_order(rows, cfg)
    survivors: list[int] = []
    if cfg.exact:
        seen: set[bytes] = set()
        for i in order:
            digest = hashlib.sha256(texts[i].encode("utf-8")).digest()
            if digest in seen:
                dropped["exact_duplicate"] += 1
            else:
                seen.add(digest)
                survivors.append(i)
    else:
        survivors = order
    if cfg.near and len(survivors) > 1:
        try:
            survivors = _near(survivors, texts, cfg, dropped)
            notes.update(threshold=cfg.threshold, shingle=f"{cfg.shingle_size} {cfg.shingle_unit}(s)")
        except ImportError:
            notes["near"] = "skipped: datasketch is not installed"
    keep = set(survivors)
    return [r for i, r in enumerate(rows) if i in keep], dropped, notes


def _near(survivors: list[int], texts: list[str], cfg: DedupeConfig, dropped: Counter[str]) -> list[int]:
    from datasketch import MinHash, MinHashLSH

    sets = [shingles(texts[i], cfg.shingle_size, cfg.shingle_unit) for i in survivors]
    # crc32 is a fast, stable shingle hash; datasketch mixes it (fmix32) before its permutations.
    hashes = MinHash.bulk(sets, num_perm=cfg.num_perm, seed=1, hashfunc=zlib.crc32)
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    kept: list[int] = []
    for pos, (i, mh) in enumerate(zip(survivors, hashes, strict=True)):
        # LSH proposes candidates; the MinHash estimate confirms them (fewer false positives).
        if any(hashes[c].jaccard(mh) >= cfg.threshold for c in lsh.query(mh)):
            dropped["near_duplicate"] += 1
            continue
        lsh.insert(pos, mh)
        kept.append(i)
    return kept


__all__ = ["dedupe_rows", "dedupe_text", "keep_order", "normalize_text", "prompt_key", "shingles"]
