"""The data preparation pipeline of the nightly retrain: exported rows in, TRL-ready splits out.

Per dataset (SFT rows, then preference pairs): load (normalise) -> clean -> PII -> dedupe ->
length (token limits) -> split -> augment (train only, optional) -> balance (train only) -> format. Every stage records
rows in / out and the reasons rows were dropped (:class:`StageStats`); see docs/data-preparation.md.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.errors import ExitCode, LoraloopError
from retrain.config import DataConfig
from retrain.data.augment import augment_rows
from retrain.data.balance import attribute_value, balance_rows
from retrain.data.cleaning import check_lengths, clean_rows
from retrain.data.dedupe import dedupe_rows
from retrain.data.formatting import Formatter, TemplateDropsToolCalls, load_chat_template
from retrain.data.pii import Scrubber, scrub_rows
from retrain.data.sources import load_seed_dataset, normalize_rows
from retrain.data.splits import SPLITS, assign_splits, fold_rows

logger = logging.getLogger("retrain.data")
Rows = list[dict[str, Any]]


@dataclass
class StageStats:
    """What one stage did to one dataset: ``stage`` is '<sft|pairs>:<stage>'."""

    stage: str
    rows_in: int
    rows_out: int
    dropped: dict[str, int] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


_JSON_COLUMNS = ("messages", "tools", "tool_choice", "response_format", "answer_tool_calls", "chosen_tool_calls",
                 "rejected_tool_calls")  # fmt: skip


@dataclass
class PreparedData:
    """Formatted rows per dataset and split, and the statistics of every stage."""

    sft: dict[str, Rows]
    pairs: dict[str, Rows]
    stats: list[StageStats]

    def to_datasets(self) -> dict[str, Any]:
        """``{"sft": DatasetDict, "pairs": DatasetDict}`` with one ``datasets.Dataset`` per split.

        ``messages`` becomes ``messages_json`` (a JSON string): a list-of-messages column next to the
        rendered ``prompt`` would make TRL take the rows for conversational ones; ``tools``, the tool-call
        columns and ``response_format`` likewise (their objects differ in shape from row to row, which an
        Arrow column cannot hold). Needs ``datasets``.
        """
        from datasets import Dataset, DatasetDict

        def convert(rows: Rows) -> Any:
            out = []
            for row in rows:
                row = dict(row)
                for name in _JSON_COLUMNS:
                    if name in row:
                        value = row.pop(name)
                        row[f"{name}_json"] = json.dumps(value, ensure_ascii=False) if value is not None else None
                out.append(row)
            return Dataset.from_list(out)

        return {
            kind: DatasetDict({split: convert(rows) for split, rows in getattr(self, kind).items()})
            for kind in ("sft", "pairs")
        }

    def fold(self, kind: str, k: int) -> tuple[Rows, Rows]:
        """(train, eval) rows of cross-validation fold ``k`` of ``kind`` ('sft' | 'pairs')."""
        rows: dict[str, Rows] = getattr(self, kind)
        return fold_rows(rows, k)

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per dataset and split."""
        return {kind: {s: len(r) for s, r in getattr(self, kind).items()} for kind in ("sft", "pairs")}

    def summary_table(self) -> str:
        """A plain-text table: rows in / out and drop reasons per stage (logs, model card)."""
        header = ("stage", "in", "out", "dropped")
        lines = [
            (s.stage, str(s.rows_in), str(s.rows_out), ", ".join(f"{k}={v}" for k, v in sorted(s.dropped.items())))
            for s in self.stats
        ]
        widths = [max(len(r[i]) for r in [header, *lines]) for i in range(3)]

        def fmt(r: tuple[str, str, str, str]) -> str:
            return f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip()

        rule = "-" * (sum(widths) + 6 + max(len(r[3]) for r in [header, *lines]))
        return "\n".join([fmt(header), rule, *(fmt(r) for r in lines)])


class NotEnoughData(LoraloopError, ValueError):
    """Fewer training rows than ``DataConfig.min_rows`` are left; ``prepared`` holds what was made. A quiet
    night, not a failure: the run is recorded as skipped and its watermark is not used."""

    exit_code = ExitCode.NOT_ENOUGH_DATA

    def __init__(self, message: str, prepared: PreparedData) -> None:
        super().__init__(message)
        self.prepared = prepared


class _Recorder:
    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.stats: list[StageStats] = []
        self.clock = time.perf_counter()

    def add(self, stage: str, rows_in: int, rows_out: int, dropped: Counter[str], notes: dict[str, Any]) -> None:
        st = StageStats(stage, rows_in, rows_out, dict(sorted(dropped.items())), notes)
        self.stats.append(st)
        why = ", ".join(f"{k}={v}" for k, v in st.dropped.items()) or "none"
        now = time.perf_counter()
        elapsed, self.clock = now - self.clock, now
        self.log.info("%s: %d -> %d rows, %.2fs, dropped: %s %s", stage, rows_in, rows_out, elapsed, why, notes or "")


def _unique_ids(rows: Rows, dropped: Counter[str]) -> Rows:
    seen: set[str] = set()
    out = []
    for row in rows:
        if row["row_id"] in seen:
            dropped["repeated_row_id"] += 1
            continue
        seen.add(row["row_id"])
        out.append(row)
    return out


def _prepare_kind(
    kind: str, rows_in: Rows, cfg: DataConfig, formatter: Formatter, seed: int, rec: _Recorder
) -> dict[str, Rows]:
    rows, dropped = normalize_rows(rows_in, kind)
    rows = _unique_ids(rows, dropped)
    rec.add(f"{kind}:load", len(rows_in), len(rows), dropped, {})
    has_template = formatter.chat_template or getattr(formatter.tokenizer, "chat_template", None)
    if any(r["messages"] for r in rows) and not has_template:
        raise ValueError("the base tokenizer has no chat template: chat rows cannot be formatted")

    n = len(rows)
    rows, dropped, notes = clean_rows(rows, cfg.cleaning)
    rec.add(f"{kind}:clean", n, len(rows), dropped, notes)

    n = len(rows)
    rows, notes = scrub_rows(rows, cfg.pii)
    rec.add(f"{kind}:pii", n, len(rows), Counter(), notes)

    n = len(rows)
    rows, dropped, notes = dedupe_rows(rows, cfg.dedupe)
    rec.add(f"{kind}:dedupe", n, len(rows), dropped, notes)

    n = len(rows)
    rows, dropped, notes = check_lengths(rows, cfg.cleaning, formatter)
    rec.add(f"{kind}:length", n, len(rows), dropped, notes)

    for row in rows:
        row["slices"] = {a: attribute_value(row, a, cfg.missing_value) for a in cfg.slice_attributes}
    by_split, notes = assign_splits(rows, cfg.splits)
    rec.add(f"{kind}:split", len(rows), len(rows), Counter(), notes)

    train = by_split["train"]
    if cfg.augment.enabled and kind in cfg.augment.kinds:
        scrub: Callable[[str], str] | None = Scrubber(cfg.pii) if cfg.pii.enabled else None
        made, notes = augment_rows(train, cfg.augment, seed=seed, missing=cfg.missing_value, scrub=scrub, log=rec.log)
        checked, dropped, _ = clean_rows(made, cfg.cleaning)  # variants pass the same checks
        checked, more, _ = check_lengths(checked, cfg.cleaning, formatter)
        dropped.update(more)
        notes["made"] = len(made)
        rec.add(f"{kind}:augment", len(train), len(train) + len(checked), dropped, notes)
        train = train + checked

    n = len(train)
    train, dropped, notes = balance_rows(train, cfg.balance, seed=seed, missing=cfg.missing_value)
    rec.add(f"{kind}:balance", n, len(train), dropped, notes)
    by_split["train"] = train

    out: dict[str, Rows] = {}
    dropped = Counter()
    before = dict(formatter.counts)
    for split in SPLITS:
        out[split] = []
        for row in by_split[split]:
            try:
                out[split].append(formatter.format_row(row))
            except TemplateDropsToolCalls:
                raise
            except Exception:  # the cleaning stage rendered these prompts already; kept for safety
                dropped["template_error"] += 1
    notes = {s: len(out[s]) for s in SPLITS}
    notes.update({k: v - before.get(k, 0) for k, v in formatter.counts.items() if v - before.get(k, 0)})
    total = sum(len(v) for v in by_split.values())
    rec.add(f"{kind}:format", total, sum(len(v) for v in out.values()), dropped, notes)
    for split in ("validation", "holdout"):
        if any(r["augmented"] or r["resampled"] for r in out[split]):
            raise RuntimeError(f"augmented or re-sampled rows reached the {split} split")  # an invariant
    return out


def prepare(
    cfg: DataConfig,
    sft_rows: list[dict[str, Any]],
    pair_rows: list[dict[str, Any]],
    tokenizer: Any,
    *,
    seed: int,
    log: logging.Logger | None = None,
) -> PreparedData:
    """Clean, scrub, dedupe, split, augment, balance and format exported rows (and the seed dataset).

    Deterministic: the same rows (in any order), config and seed give the same output. The splits
    depend on ``cfg.splits.salt`` only, never on ``seed``. Raises :class:`NotEnoughData` when fewer
    than ``cfg.min_rows`` original training rows (SFT + pairs) are left.
    """
    if tokenizer is None:
        raise TypeError("prepare() needs the base model's tokenizer (chat template, token limits)")
    rec = _Recorder(log or logger)
    inputs = {"sft": list(sft_rows), "pairs": list(pair_rows)}
    if cfg.seed_dataset is not None:
        seed_data = load_seed_dataset(cfg.seed_dataset)
        inputs["sft"] += seed_data.sft
        inputs["pairs"] += seed_data.pairs
        n_sft, n_pairs = len(seed_data.sft), len(seed_data.pairs)
        rec.log.info("seed dataset %s: %d SFT rows, %d pairs", cfg.seed_dataset, n_sft, n_pairs)
    formatter = Formatter(tokenizer, load_chat_template(cfg.chat_template))
    result = {kind: _prepare_kind(kind, inputs[kind], cfg, formatter, seed, rec) for kind in ("sft", "pairs")}
    prepared = PreparedData(result["sft"], result["pairs"], rec.stats)
    originals = sum(
        1 for kind in ("sft", "pairs") for r in result[kind]["train"] if not r["augmented"] and not r["resampled"]
    )
    if originals < cfg.min_rows:
        msg = f"{originals} training rows after preparation, fewer than min_rows={cfg.min_rows}"
        raise NotEnoughData(msg, prepared)
    return prepared


__all__ = ["NotEnoughData", "PreparedData", "StageStats", "prepare"]
