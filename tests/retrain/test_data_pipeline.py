"""The whole `prepare` on crafted rows: stage statistics, determinism, balance modes, outputs, sources."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest

from retrain.config import DataConfig
from retrain.data import NotEnoughData, PreparedData, load_export_dir, prepare
from retrain.data.sources import export_from_store

LONG = (
    "Thanks for reaching out. To change the delivery address, open your order, choose Edit address, enter the "
    "new one and confirm; if the parcel has already shipped we will contact the carrier for you."
)


def sft_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(q: str, a: str, label: str = "pos", **kw: Any) -> None:
        i = len(rows)
        rows.append(
            {
                "row_id": f"s{i:03d}",
                "origin": "rated_good",
                "messages": [{"role": "user", "content": q}],
                "completion": a,
                "request_id": f"req-{i}",
                "alias": "support",
                "labels": [],
                "metadata": {"task": "support" if i % 2 else "billing", "label": label},
                "available_at": f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}",
                **kw,
            }
        )

    for i in range(100):  # 90/10 imbalanced label
        add(
            f"Customer question {i}: where is parcel {i}?",
            f"Parcel {i} is on its way.",
            "neg" if i % 10 == 0 else "pos",
        )
    for _ in range(3):
        add("Customer question 1: where is parcel 1?", "Parcel 1 is on its way.")  # exact duplicates
    add("How do I change my delivery address for an order?", LONG)
    add("How do I change my delivery address for an order?", LONG.replace("carrier", "courier"))  # near duplicate
    add("My e-mail is jane@corp.io and my card 4111 1111 1111 1111, call +1 202-555-0143", "Noted, jane@corp.io.")
    add("Broken \ufffd text", "Fine.")
    add("Empty answer?", "   ")
    add("Failed request?", "Partial", status=500)
    add("Cut off?", "The answer was cut", finish_reason="length")
    rows.append({"row_id": "bad", "completion": "no prompt at all"})
    return rows


def pair_rows() -> list[dict[str, Any]]:
    rows = [
        {
            "row_id": f"p{i:03d}",
            "origin": "rating",
            "messages": [{"role": "user", "content": f"Rate option {i}"}],
            "chosen": f"Option {i} is good.",
            "rejected": f"Option {i} is bad.",
            "chosen_request_id": f"pr-{i}",
            "metadata": {"label": "neg" if i % 10 == 0 else "pos"},
        }
        for i in range(30)
    ]
    rows.append({**rows[0], "row_id": "p-dup"})
    rows.append({**rows[1], "row_id": "p-same", "rejected": rows[1]["chosen"]})
    return rows


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def cfg(**kw: Any) -> DataConfig:
    return DataConfig(**{"min_rows": 0, **kw})


def stage(p: PreparedData, name: str) -> Any:
    return next(s for s in p.stats if s.stage == name)


def test_stages_count_and_explain_every_drop(tok: Any) -> None:
    p = prepare(cfg(), sft_rows(), pair_rows(), tok, seed=0)
    names = ["load", "clean", "pii", "dedupe", "length", "split", "balance", "format"]
    assert [s.stage for s in p.stats] == [f"{k}:{n}" for k in ("sft", "pairs") for n in names]
    assert stage(p, "sft:load").dropped == {"invalid_row": 1}
    assert stage(p, "sft:clean").dropped == {
        "broken_encoding": 1,
        "empty_answer": 1,
        "error_response": 1,
        "truncated": 1,
    }
    assert stage(p, "sft:dedupe").dropped == {"exact_duplicate": 3, "near_duplicate": 1}
    assert stage(p, "sft:pii").notes["replacements"] == {"email": 2, "phone": 1, "card": 1, "ip": 0, "key": 0}
    assert stage(p, "pairs:clean").dropped == {"identical_pair": 1}
    assert stage(p, "pairs:dedupe").dropped == {"exact_duplicate": 1}
    for kind in ("sft", "pairs"):
        chain = [stage(p, f"{kind}:{n}") for n in names[:6]]
        assert all(a.rows_out == b.rows_in for a, b in itertools.pairwise(chain))
        assert all(s.rows_in - s.rows_out == sum(s.dropped.values()) for s in chain)
    assert sum(len(v) for v in p.sft.values()) == 102 and sum(len(v) for v in p.pairs.values()) == 30
    table = p.summary_table()
    assert "sft:dedupe" in table and "exact_duplicate=3, near_duplicate=1" in table
    rows = [r for split in p.sft.values() for r in split]
    scrubbed = next(r for r in rows if "<EMAIL>" in r["prompt"])
    assert (
        "<CARD>" in scrubbed["prompt"] and "<PHONE>" in scrubbed["prompt"] and scrubbed["answer"] == "Noted, <EMAIL>."
    )
    assert all(set(r["slices"]) == {"task", "label"} for r in rows)
    assert {r["slices"]["task"] for r in rows} == {"support", "billing"}


def test_whole_prepare_is_deterministic(tok: Any) -> None:
    c = cfg(
        balance={"attribute": "label", "mode": "resample"},
        augment={"enabled": True, "techniques": ["templates", "case_punctuation"]},
    )
    first = prepare(c, sft_rows(), pair_rows(), tok, seed=3)
    shuffled_sft, shuffled_pairs = sft_rows(), pair_rows()
    random.Random(1).shuffle(shuffled_sft)
    random.Random(2).shuffle(shuffled_pairs)
    again = prepare(c, shuffled_sft, shuffled_pairs, tok, seed=3)
    assert again.sft == first.sft and again.pairs == first.pairs
    assert again.summary_table() == first.summary_table()
    other_seed = prepare(c, sft_rows(), pair_rows(), tok, seed=4)
    assert {s: [r["row_id"] for r in rs] for s, rs in other_seed.sft.items() if s != "train"} == {
        s: [r["row_id"] for r in rs] for s, rs in first.sft.items() if s != "train"
    }  # the seed never moves rows between splits


def test_balance_modes_on_the_training_split(tok: Any) -> None:
    resampled = prepare(cfg(balance={"attribute": "label", "mode": "resample"}), sft_rows(), [], tok, seed=0)
    train = resampled.sft["train"]
    counts = {v: sum(r["slices"]["label"] == v for r in train) for v in ("pos", "neg")}
    assert counts["pos"] == counts["neg"]
    assert not any(r["resampled"] for r in resampled.sft["validation"] + resampled.sft["holdout"])
    weighted = prepare(cfg(balance={"attribute": "label"}), sft_rows(), [], tok, seed=0)
    weights = [r["weight"] for r in weighted.sft["train"]]
    assert sum(weights) / len(weights) == pytest.approx(1.0)
    neg = next(r["weight"] for r in weighted.sft["train"] if r["slices"]["label"] == "neg")
    pos = next(r["weight"] for r in weighted.sft["train"] if r["slices"]["label"] == "pos")
    assert neg > 5 * pos
    assert {r["weight"] for r in weighted.sft["holdout"] + weighted.sft["validation"]} == {1.0}


def test_to_datasets_and_min_rows(tok: Any) -> None:
    p = prepare(cfg(), sft_rows(), pair_rows(), tok, seed=0)
    ds = p.to_datasets()
    train = ds["sft"]["train"]
    assert train.num_rows == len(p.sft["train"])
    assert {"prompt", "completion", "messages_json", "weight", "slices"} <= set(train.column_names)
    assert "messages" not in train.column_names  # TRL would take the rows for conversational ones
    assert json.loads(train[0]["messages_json"]) == p.sft["train"][0]["messages"]
    assert set(ds["pairs"]["train"].column_names) >= {"prompt", "chosen", "rejected"}
    with pytest.raises(NotEnoughData) as err:
        prepare(cfg(min_rows=10_000), sft_rows(), pair_rows(), tok, seed=0)
    assert err.value.prepared.summary_table() == p.summary_table()


def test_seed_dataset_joins_with_derived_ids(tok: Any, tmp_path: Path) -> None:
    seed_file = tmp_path / "seed.jsonl"
    seed_rows = [
        {
            "messages": [{"role": "user", "content": f"Seed question {i}?"}],
            "completion": f"Seed answer {i}.",
            "metadata": {"task": "seed"},
        }
        for i in range(20)
    ]
    seed_rows.append({"prompt": "Seed text", "chosen": "good continuation", "rejected": "bad continuation"})
    seed_file.write_text("".join(json.dumps(r) + "\n" for r in seed_rows))
    p = prepare(cfg(seed_dataset=seed_file), [], [], tok, seed=0)
    rows = [r for split in p.sft.values() for r in split]
    assert len(rows) == 20 and all(r["origin"] == "seed" and r["request_id"].startswith("derived-") for r in rows)
    again = prepare(cfg(seed_dataset=seed_file), [], [], tok, seed=0)
    assert [r["request_id"] for s in again.sft.values() for r in s] == [r["request_id"] for r in rows]
    assert sum(len(v) for v in p.pairs.values()) == 1


def test_from_the_event_store(tok: Any, tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from core.store_config import StoreConfig
    from feedback.events import FeedbackEvent, RequestEvent
    from feedback.store import EventStore

    store_cfg = StoreConfig(root=tmp_path / "events", fsync=False, flush_interval_s=0.01)
    with EventStore(store_cfg, "w1", registry=CollectorRegistry()) as store:
        for i in range(12):
            rid = f"r{i}"
            store.submit(
                RequestEvent(
                    request_id=rid,
                    alias="support",
                    endpoint="chat",
                    status=200,
                    messages=[{"role": "user", "content": f"Is item {i} in stock?"}],
                    completion=f"Item {i} is in stock.",
                    latency_ms=3.0,
                    replica="w1",
                )
            )
            kind, value = ("thumbs", True) if i % 3 else ("correction", f"Item {i} ships tomorrow.")
            store.write_feedback(FeedbackEvent(request_id=rid, kind=kind, value=value, metadata={"task": "stock"}))
        store.flush()
    data = export_from_store(tmp_path / "events", tmp_path / "export", lag_s=0)
    assert data.watermark is not None and len(data.sft) == 12 and len(data.pairs) == 4
    assert len(load_export_dir(tmp_path / "export").sft) == 12
    p = prepare(cfg(), data.sft, data.pairs, tok, seed=0)
    rows = [r for split in p.sft.values() for r in split]
    assert len(rows) == 12 and {r["slices"]["task"] for r in rows} == {"stock"}
    assert {r["origin"] for r in rows} == {"rated_good", "correction"}
    assert sum(len(v) for v in p.pairs.values()) == 4


def test_tokenizer_requirements(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    with pytest.raises(TypeError, match="tokenizer"):
        prepare(cfg(), sft_rows(), [], None, seed=0)
    bare = AutoTokenizer.from_pretrained(tiny_model_dir)
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        prepare(cfg(), sft_rows(), [], bare, seed=0)
    text = [{"row_id": "t", "prompt": "Once upon", "completion": " a time."}]  # completions rows need no template
    p = prepare(cfg(), text, [], bare, seed=0)
    assert [r["completion"] for s in p.sft.values() for r in s] == [" a time.<|im_end|>"]
