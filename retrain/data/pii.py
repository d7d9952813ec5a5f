"""PII and secret scrubbing with typed placeholders: <EMAIL>, <PHONE>, <CARD>, <IP>, <KEY>.

Detectors run in a fixed order so that one does not eat another's match: keys first (an API key
may contain digit runs and '@'), then e-mails, card numbers (Luhn-valid only), IP addresses
(validated with :mod:`ipaddress`), phone numbers. Everything is regex-based and conservative:
a phone number needs a leading ``+`` or separators in a usual grouping, a bare hex string must be
longer than a SHA-1 digest, a bare base64-like string needs mixed case, digits and high entropy.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from retrain.config import PIIConfig
from retrain.data.sources import map_texts

PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "card": "<CARD>", "ip": "<IP>", "key": "<KEY>"}

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}(?![\w-])")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?:/\d{1,2})?(?![\w]|\.\d)")
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|(?:\d{1,3}\.){3}\d{1,3})(?:%\w+)?(?![\w:])"
)
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"  # +33 6 12 34 56 78, +1-202-555-0143
    r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]\d{3,4}"  # (202) 555-0143
    r"|\d{3}[.-]\d{3}[.-]\d{4}|\d{3} \d{3} \d{4}"  # 202-555-0143, 202.555.0143, 202 555 0143
    r"|0\d(?:[ .]\d{2}){4}"  # 06 12 34 56 78
    r")(?![\w])"
)
_KNOWN_KEYS = re.compile(
    r"(?<![\w-])(?:"
    r"sk-(?=[A-Za-z0-9_-]*\d)[A-Za-z0-9_-]{16,}"  # OpenAI / Anthropic style (random: has digits)
    r"|(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"  # GitHub
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT
    r")"
)
_BEARER = re.compile(r"(?i)(\b(?:bearer|basic)\s+)([A-Za-z0-9._~+/=-]{16,})")
# `api_key = ...`, `"client_secret": "..."`, `password: ...` (not `max_tokens=512`, `author: ...`).
_ASSIGNED = re.compile(
    r"(?i)(\b(?:[A-Za-z0-9]+[_-])*(?:api[_-]?key|apikey|secret|token|passw(?:or)?d|passwd|pwd|credentials?"
    r"|access[_-]?key|private[_-]?key)(?:[_-][A-Za-z0-9]+)*[\"']?\s*[:=]\s*[\"']?)([A-Za-z0-9._~+/=!@#$%^&*-]{6,})"
)
_DIGIT = re.compile(r"\d")
_BLOB = re.compile(r"(?<![\w+/=-])[A-Za-z0-9+/_-]{16,}={0,2}(?![\w+/=-])")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a digit string (card numbers)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(c / len(text) * math.log2(c / len(text)) for c in counts.values())


class Scrubber:
    """Replaces PII in strings and counts replacements per type (``counts``)."""

    def __init__(self, cfg: PIIConfig) -> None:
        self.cfg = cfg
        self.counts: Counter[str] = Counter()
        self.rows_changed = 0
        steps: dict[str, Callable[[str], str]] = {
            "key": self._keys, "email": self._email, "card": self._cards, "ip": self._ips, "phone": self._phones,
        }  # fmt: skip
        self._steps = [fn for name, fn in steps.items() if name in cfg.types]

    def _sub(self, pattern: re.Pattern[str], kind: str, text: str, accept: Callable[[str], bool] | None = None) -> str:
        def repl(m: re.Match[str]) -> str:
            if accept is not None and not accept(m.group(0)):
                return m.group(0)
            self.counts[kind] += 1
            return PLACEHOLDERS[kind]

        return pattern.sub(repl, text)

    def _keys(self, text: str) -> str:
        text = self._sub(_KNOWN_KEYS, "key", text)

        def keep_prefix(m: re.Match[str]) -> str:
            value = m.group(2)
            if len(value) < 16 and not re.search(r"[\d\W_]", value):
                return m.group(0)  # a plain word after `password:` is more likely prose than a secret
            self.counts["key"] += 1
            return m.group(1) + PLACEHOLDERS["key"]

        text = _BEARER.sub(keep_prefix, text)
        text = _ASSIGNED.sub(keep_prefix, text)
        return self._sub(_BLOB, "key", text, self._secret_like)

    def _secret_like(self, s: str) -> bool:
        body = s.rstrip("=")
        if re.fullmatch(r"[0-9a-fA-F]+", body):
            return len(body) >= self.cfg.min_hex_secret_length
        if len(body) < self.cfg.min_secret_length or body.count("/") > 2:
            return False  # too short, or rather a path
        classes = sum(bool(re.search(p, body)) for p in ("[a-z]", "[A-Z]", "[0-9]"))
        return classes == 3 and _entropy(body) >= 4.0

    def _email(self, text: str) -> str:
        return self._sub(_EMAIL, "email", text) if "@" in text else text

    def _cards(self, text: str) -> str:
        if not _DIGIT.search(text):
            return text
        return self._sub(_CARD, "card", text, lambda s: luhn_valid(re.sub(r"\D", "", s)))

    def _ips(self, text: str) -> str:
        def v4(s: str) -> bool:
            try:
                ipaddress.IPv4Network(s, strict=False) if "/" in s else ipaddress.IPv4Address(s)
            except ValueError:
                return False
            return True

        def v6(s: str) -> bool:
            try:
                ipaddress.IPv6Address(s.split("%")[0])
            except ValueError:
                return False
            return sum(1 for g in re.split(r"[:.]", s) if g) >= 2  # not a bare '::'

        if "." in text and _DIGIT.search(text):
            text = self._sub(_IPV4, "ip", text, v4)
        return self._sub(_IPV6, "ip", text, v6) if text.count(":") >= 2 else text

    def _phones(self, text: str) -> str:
        if not _DIGIT.search(text):
            return text
        return self._sub(_PHONE, "phone", text, lambda s: 7 <= len(re.sub(r"\D", "", s)) <= 15)

    def __call__(self, text: str) -> str:
        for step in self._steps:
            text = step(text)
        return text

    def scrub_row(self, row: dict[str, Any]) -> dict[str, Any]:
        before = sum(self.counts.values())
        out = map_texts(row, self)
        if sum(self.counts.values()) != before:
            self.rows_changed += 1
        return out


def scrub_rows(rows: list[dict[str, Any]], cfg: PIIConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Scrubbed copies of the rows and notes: replacements per type and rows changed."""
    if not cfg.enabled:
        return list(rows), {"enabled": False}
    scrubber = Scrubber(cfg)
    out = [scrubber.scrub_row(r) for r in rows]
    replacements = {t: scrubber.counts.get(t, 0) for t in cfg.types}
    return out, {"replacements": replacements, "rows_changed": scrubber.rows_changed}


__all__ = ["PLACEHOLDERS", "Scrubber", "luhn_valid", "scrub_rows"]
