"""PII scrubbing: every type, Luhn-checked cards, secrets, counts, and what must stay untouched."""

from __future__ import annotations

import pytest

from retrain.config import PIIConfig
from retrain.data.pii import Scrubber, luhn_valid, scrub_rows
from retrain.data.sources import normalize_rows


def scrub(text: str, **cfg: object) -> tuple[str, dict[str, int]]:
    s = Scrubber(PIIConfig(**cfg))  # type: ignore[arg-type]
    return s(text), dict(s.counts)


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("mail john.doe+news@mail.example.co.uk now", "mail <EMAIL> now", "email"),
        ("call +1 (202) 555-0143 today", "call <PHONE> today", "phone"),
        ("call 202-555-0143.", "call <PHONE>.", "phone"),
        ("appelle le +33 6 12 34 56 78", "appelle le <PHONE>", "phone"),
        ("appelle le 06 12 34 56 78", "appelle le <PHONE>", "phone"),
        ("card 4111 1111 1111 1111 ok", "card <CARD> ok", "card"),
        ("card 5500-0055-5555-5559", "card <CARD>", "card"),
        ("host 192.168.1.10:8080", "host <IP>:8080", "ip"),
        ("net 10.0.0.0/8", "net <IP>", "ip"),
        ("v6 2001:db8::8a2e:370:7334 end", "v6 <IP> end", "ip"),
        ("link fe80::1%eth0", "link <IP>", "ip"),
        ("key sk-abc123DEF456ghi789JKL", "key <KEY>", "key"),
        ("aws AKIAIOSFODNN7EXAMPLE", "aws <KEY>", "key"),
        ("Authorization: Bearer abcdef0123456789ABCDEF", "Authorization: Bearer <KEY>", "key"),
        ('{"api_key": "9f8e7d6c5b4a39281706f5e4d3c2b1a0"}', '{"api_key": "<KEY>"}', "key"),
        ("password: hunter22", "password: <KEY>", "key"),
        ("tok ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789", "tok <KEY>", "key"),
        ("blob Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZg==", "blob <KEY>", "key"),
    ],
)
def test_each_type_is_replaced_and_counted(text: str, expected: str, kind: str) -> None:
    out, counts = scrub(text)
    assert out == expected
    assert counts == {kind: 1}


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112 fails the Luhn check",
        "order 1234567890123 shipped",
        "version v1.2.3.4, at 10:30:00, std::vector, mac 00:1A:2B:3C:4D:5E, ::1",
        "not an ip 999.1.1.1",
        "commit 3f786850e387550fdab836ed7e6dc881de23001b and md5 d41d8cd98f00b204e9800998ecf8427e",
        "max_tokens=512, author: Shakespeare, secret: happiness, sk-learn-is-a-nice-library",
        "path /usr/local/lib/python3.11/site-packages/Foo2Bar and internationalization",
        "year 2024-01-15, total 1,234,567.89, ratio 3/4",
        "placeholders stay: <EMAIL> <PHONE> <CARD> <IP> <KEY>",
    ],
)
def test_conservative_no_false_positives(text: str) -> None:
    out, counts = scrub(text)
    assert out == text
    assert counts == {}


def test_luhn() -> None:
    assert luhn_valid("4111111111111111") and luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112") and not luhn_valid("79927398710")


def test_types_can_be_switched_off() -> None:
    text = "x@example.com 192.168.0.1"
    assert scrub(text, types=["ip"]) == ("x@example.com <IP>", {"ip": 1})


def test_rows_scrubbed_in_prompts_and_answers_with_counts() -> None:
    sft, _ = normalize_rows(
        [
            {
                "row_id": "a",
                "messages": [
                    {"role": "system", "content": "Agent key sk-abc123DEF456ghi789JKL"},
                    {"role": "user", "content": "I am jane@corp.io, card 4111111111111111"},
                ],
                "completion": "Noted jane@corp.io; we call +44 20 7946 0958.",
            },
            {"row_id": "b", "prompt": "Server 10.1.2.3 says", "completion": " hello."},
        ],
        "sft",
    )
    out, notes = scrub_rows(sft, PIIConfig())
    assert out[0]["messages"][0]["content"] == "Agent key <KEY>"
    assert out[0]["messages"][1]["content"] == "I am <EMAIL>, card <CARD>"
    assert out[0]["completion"] == "Noted <EMAIL>; we call <PHONE>."
    assert out[1]["prompt"] == "Server <IP> says"
    assert notes == {"replacements": {"email": 2, "phone": 1, "card": 1, "ip": 1, "key": 1}, "rows_changed": 2}
    assert sft[0]["completion"].startswith("Noted jane@")  # inputs are not modified

    pairs, _ = normalize_rows(
        [{"row_id": "p", "prompt": "Q", "chosen": "mail a@b.io", "rejected": "call 202-555-0143"}], "pairs"
    )
    out, notes = scrub_rows(pairs, PIIConfig())
    assert (out[0]["chosen"], out[0]["rejected"]) == ("mail <EMAIL>", "call <PHONE>")
    assert scrub_rows(pairs, PIIConfig(enabled=False))[0][0]["chosen"] == "mail a@b.io"
