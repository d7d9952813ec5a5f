"""Subcommands of the `loraloop` CLI for the event store: report, experiments, export, events.

deploy/cli.py calls :func:`register`; every handler receives the parsed arguments with a
``settings`` attribute (``args.settings.store`` is the StoreConfig) and returns the exit code. Errors are
raised as core.errors types (``_one_line_errors``); the CLI's main prints them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from core.errors import LoraloopError, UsageError
from core.store_config import StoreConfig
from feedback.experiments import Arm, ExperimentRepo, Guardrails
from feedback.migrations import ensure_current, read_version


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `report`, `experiments`, `export` and `events` to the main CLI."""
    p = subparsers.add_parser("report", help="A/B report of an experiment (table, optional plot).")
    p.add_argument("experiment", help="Experiment id.")
    p.add_argument("--plot", type=Path, help="Write the plot here (.png, or .html with the table).")
    p.add_argument("--alpha", type=float, default=0.05, help="Significance level (default 0.05).")
    p.set_defaults(func=cmd_report, needs_settings=True)

    e = subparsers.add_parser("experiments", help="Create, list, change and stop experiments.")
    es = e.add_subparsers(dest="experiments_command", required=True, metavar="{create,list,update,stop}")
    c = es.add_parser("create", help="Start an experiment on an alias.")
    c.add_argument("--alias", required=True, help="Alias whose traffic is split.")
    c.add_argument(
        "--arm",
        action="append",
        required=True,
        metavar="NAME[=ADAPTER][:WEIGHT]",
        help="An arm (repeat); no adapter (or 'base') = the base model; weight defaults to 1.",
    )
    c.add_argument("--control", help="Control arm (default: the first).")
    c.add_argument("--id", help="Experiment id (default: generated).")
    c.add_argument("--salt", help="Assignment salt (default: random).")
    c.add_argument("--start", type=_when, help="Start time, ISO 8601 (default: now).")
    c.add_argument("--description", default="", help="Free text.")
    _shared_options(c)
    c.set_defaults(func=cmd_experiments_create, needs_settings=True)
    ls = es.add_parser("list", help="List experiments.")
    ls.add_argument("--alias", help="Only this alias.")
    ls.add_argument("--json", action="store_true", help="Print JSON lines.")
    ls.set_defaults(func=cmd_experiments_list, needs_settings=True)
    u = es.add_parser("update", help="Change weights, arms, end or guardrails (minimal user movement).")
    u.add_argument("id", help="Experiment id.")
    u.add_argument("--weight", action="append", default=[], metavar="NAME=WEIGHT", help="New weight (repeat).")
    u.add_argument("--arm", action="append", metavar="NAME[=ADAPTER][:WEIGHT]", help="Replace the arms (repeat).")
    u.add_argument("--control", help="New control arm.")
    _shared_options(u)
    u.set_defaults(func=cmd_experiments_update, needs_settings=True)
    s = es.add_parser("stop", help="Stop an experiment now.")
    s.add_argument("id", help="Experiment id.")
    s.set_defaults(func=cmd_experiments_stop, needs_settings=True)

    x = subparsers.add_parser("export", help="Export training data (SFT rows, preference pairs) since a watermark.")
    x.add_argument("--since", default=None, help="Watermark: ISO time, or a previous export's manifest/dir.")
    x.add_argument("--out", type=Path, required=True, help="Output directory.")
    x.add_argument("--good-score", type=float, default=4.0, help="Scores at or above are good (default 4).")
    x.add_argument("--bad-score", type=float, default=2.0, help="Scores at or below are bad (default 2).")
    x.set_defaults(func=cmd_export, needs_settings=True)

    ev = subparsers.add_parser("events", help="Event store maintenance.")
    evs = ev.add_subparsers(dest="events_command", required=True, metavar="{status,migrate}")
    st = evs.add_parser("status", help="Schema version, rows per table, unmatched feedback.")
    st.set_defaults(func=cmd_events_status, needs_settings=True)
    mg = evs.add_parser("migrate", help="Upgrade the store to this version's schema.")
    mg.set_defaults(func=cmd_events_migrate, needs_settings=True)


def _shared_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metric", choices=["thumbs_up_rate", "mean_score"], help="Primary metric.")
    p.add_argument("--end", type=_when, help="End time, ISO 8601.")
    p.add_argument("--error-rate-max", type=float, help="Guardrail: max share of 5xx responses.")
    p.add_argument("--p95-max-ms", type=float, help="Guardrail: max p95 latency in ms.")
    p.add_argument("--negative-rate-max", type=float, help="Guardrail: max share of thumbs down.")


def _when(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None


def parse_arm(spec: str) -> Arm:
    """``NAME[=ADAPTER][:WEIGHT]`` → Arm (adapter ``base``/``none``/empty = the base model)."""
    head, _, weight = spec.partition(":")
    name, _, adapter = head.partition("=")
    if not name:
        raise ValueError(f"arm {spec!r} needs a name")
    return Arm(
        name=name.strip(),
        adapter=None if adapter.strip().lower() in ("", "base", "none") else adapter.strip(),
        weight=float(weight) if weight else 1.0,
    )


def _store(args: argparse.Namespace) -> StoreConfig:
    settings = getattr(args, "settings", None)
    store = getattr(settings, "store", None)
    return store if isinstance(store, StoreConfig) else StoreConfig()


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """A bad value given by the operator (ValueError: an unknown experiment, a malformed arm) is a usage error
    (exit 2); a store that cannot be read (OSError) a failure (exit 1). The message keeps every line."""
    try:
        yield
    except LoraloopError:
        raise
    except (ValueError, KeyError) as exc:
        raise UsageError(" ".join(str(exc).split())) from exc
    except OSError as exc:
        raise LoraloopError(" ".join(str(exc).split())) from exc


def _guardrails(args: argparse.Namespace, base: Guardrails | None) -> Guardrails | None:
    given = {
        "error_rate_max": args.error_rate_max,
        "p95_latency_ms_max": args.p95_max_ms,
        "negative_feedback_rate_max": args.negative_rate_max,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return base
    return (base or Guardrails()).model_copy(update=given)


def cmd_report(args: argparse.Namespace) -> int:
    """`loraloop report EXPERIMENT [--plot PATH]`."""
    from feedback.plot import write_plot
    from feedback.report import build_report

    with _one_line_errors():
        report = build_report(_store(args).root, args.experiment, alpha=args.alpha)
    print(report.to_table())
    if args.plot:
        print(f"plot written to {write_plot(report, args.plot)}")
    return 0


def cmd_experiments_create(args: argparse.Namespace) -> int:
    """`loraloop experiments create --alias A --arm control --arm lora=my-adapter ...`."""
    with _one_line_errors():
        arms = [parse_arm(a) for a in args.arm]
        kwargs: dict[str, Any] = {}
        if args.metric:
            kwargs["primary_metric"] = args.metric
        exp = ExperimentRepo(_store(args).root).create(
            args.alias,
            arms,
            args.control,
            id=args.id,
            salt=args.salt,
            start=args.start,
            end=args.end,
            guardrails=_guardrails(args, None),
            description=args.description,
            actor="cli",
            **kwargs,
        )
    print(f"created experiment {exp.id} on alias {exp.alias}: " + ", ".join(_arm_text(a) for a in exp.arms))
    return 0


def cmd_experiments_list(args: argparse.Namespace) -> int:
    """`loraloop experiments list [--alias A] [--json]`."""
    with _one_line_errors():
        exps = ExperimentRepo(_store(args).root).list(args.alias)
    for exp in exps:
        if args.json:
            print(exp.model_dump_json(exclude={"layout"}))
        else:
            end = f"{exp.end:%Y-%m-%d %H:%M}" if exp.end else "open"
            print(
                f"{exp.id}  {exp.alias}  {exp.status}  v{exp.version}  {exp.primary_metric}  "
                f"{exp.start:%Y-%m-%d %H:%M}..{end}  " + ", ".join(_arm_text(a) for a in exp.arms)
            )
    if not exps and not args.json:
        print("no experiments")
    return 0


def cmd_experiments_update(args: argparse.Namespace) -> int:
    """`loraloop experiments update ID --weight lora=3 ...`."""
    repo = ExperimentRepo(_store(args).root)
    with _one_line_errors():
        weights = {}
        for w in args.weight:
            name, _, value = w.partition("=")
            weights[name.strip()] = float(value)
        current = repo.get(args.id)
        exp = repo.update(
            args.id,
            arms=[parse_arm(a) for a in args.arm] if args.arm else None,
            weights=weights or None,
            control=args.control,
            end=args.end,
            primary_metric=args.metric,
            guardrails=_guardrails(args, current.guardrails),
            actor="cli",
        )
    print(f"experiment {exp.id} is now v{exp.version}: " + ", ".join(_arm_text(a) for a in exp.arms))
    return 0


def cmd_experiments_stop(args: argparse.Namespace) -> int:
    """`loraloop experiments stop ID`."""
    with _one_line_errors():
        exp = ExperimentRepo(_store(args).root).stop(args.id, actor="cli")
    print(f"experiment {exp.id} stopped")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`loraloop export --since W --out DIR`: prints the counts and the new watermark."""
    from feedback.export import export_training_data, parse_watermark

    store = _store(args)
    with _one_line_errors():
        since = parse_watermark(args.since)
        result = export_training_data(
            store.root,
            args.out,
            since=since,
            lag_s=store.export_lag_s,
            good_score=args.good_score,
            bad_score=args.bad_score,
            as_datasets=False,
        )
    print(f"exported {result.counts['sft']} sft rows and {result.counts['pairs']} preference pairs to {args.out}")
    print(f"watermark {result.watermark.isoformat()}")
    return 0


def cmd_events_status(args: argparse.Namespace) -> int:
    """`loraloop events status`: version, rows per table, unmatched feedback (JSON)."""
    from feedback.reader import StoreReader

    root = _store(args).root
    with _one_line_errors():
        reader = StoreReader(root)
        con = reader.connect()
        try:
            counts = {}
            for table in ("requests", "feedback", "assignments", "adapter_changes"):
                row = con.execute(f"SELECT count(*) FROM {table}").fetchone()
                counts[table] = int(row[0]) if row else 0
            pending = reader.pending_feedback_count(con)
        finally:
            con.close()
    snap = reader.snapshot
    print(
        json.dumps(
            {
                "root": str(root),
                "schema_version": read_version(root),
                "rows": counts,
                "pending_feedback": pending,
                "segments": snap.segments,
                "wal_files": snap.wal_files,
                "duplicate_ids": snap.duplicates,
            }
        )
    )
    return 0


def cmd_events_migrate(args: argparse.Namespace) -> int:
    """`loraloop events migrate`: upgrade the store's schema in place."""
    root = _store(args).root
    with _one_line_errors():
        before = ensure_current(root)
    print(f"event store {root}: schema {before} -> {read_version(root)}")
    return 0


def _arm_text(a: Arm) -> str:
    return f"{a.name}={a.adapter or 'base'}:{a.weight:g}"
