"""Store layout on disk (names, listing) and the JSON-lines encoding of WAL records.

<root>/STORE.json                      schema version of the whole store
<root>/<writer>/LOCK                   flock held by the live writer process
<root>/<writer>/wal-<seq>.jsonl        append-only write-ahead log (one event per line)
<root>/<writer>/<table>-<seq>.parquet  sealed, immutable segment made from wal-<seq>
<root>/_experiments/<id>/v<version>.json   experiment versions (see experiments.py)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from feedback.events import AdapterChangeEvent, AssignmentEvent, FeedbackEvent, RequestEvent

WRITER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_WAL = re.compile(r"^wal-(\d{12})\.jsonl$")
_SEGMENT = re.compile(r"^([a-z_]+)-(\d{12})\.parquet$")
# what an alias's privacy switch (log_text: false) keeps out of the store: everything a request or its answers say
TEXT_FIELDS = frozenset({"messages", "prompt", "completion", "choices", "tools", "tool_choice", "response_format"})

TABLE_OF: dict[type, str] = {
    RequestEvent: "requests",
    FeedbackEvent: "feedback",
    AssignmentEvent: "assignments",
    AdapterChangeEvent: "adapter_changes",
}


def wal_name(seq: int) -> str:
    """File name of WAL number ``seq``."""
    return f"wal-{seq:012d}.jsonl"


def segment_name(table: str, seq: int) -> str:
    """File name of the ``table`` segment sealed from WAL ``seq``."""
    return f"{table}-{seq:012d}.parquet"


@dataclass(frozen=True)
class WalFile:
    """A WAL file of some writer."""

    writer: str
    seq: int
    path: Path


@dataclass(frozen=True)
class Segment:
    """A sealed Parquet segment."""

    writer: str
    table: str
    seq: int
    path: Path


def writer_dirs(root: Path) -> list[Path]:
    """Directories of all writers (anything not starting with `_` or `.`)."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    return sorted(
        Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(("_", ".")) and WRITER_ID.match(e.name)
    )


def _scan(directory: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(directory)]
    except FileNotFoundError:
        return []


def list_wals(root: Path, writer: str | None = None) -> list[WalFile]:
    """WAL files, oldest first per writer."""
    dirs = [root / writer] if writer else writer_dirs(root)
    out = []
    for d in dirs:
        for name in _scan(d):
            m = _WAL.match(name)
            if m:
                out.append(WalFile(d.name, int(m.group(1)), d / name))
    return sorted(out, key=lambda w: (w.writer, w.seq))


def list_segments(root: Path, table: str | None = None, writer: str | None = None) -> list[Segment]:
    """Sealed segments (optionally of one table / one writer)."""
    dirs = [root / writer] if writer else writer_dirs(root)
    out = []
    for d in dirs:
        for name in _scan(d):
            m = _SEGMENT.match(name)
            if m and (table is None or m.group(1) == table):
                out.append(Segment(d.name, m.group(1), int(m.group(2)), d / name))
    return sorted(out, key=lambda s: (s.writer, s.table, s.seq))


def stamp_now() -> bytes:
    """The current UTC time as a JSON string (the `logged_at` of the records written now)."""
    return b'"' + datetime.now(UTC).isoformat().encode() + b'"'


class Redacted:
    """A request event whose text must not be stored (privacy switch of its alias)."""

    __slots__ = ("event",)

    def __init__(self, event: RequestEvent) -> None:
        self.event = event


def encode(item: Any, stamp: bytes, extra: dict[str, Any] | None = None) -> bytes:
    """One WAL line for an event (or a :class:`Redacted` request event)."""
    if isinstance(item, Redacted):
        body = item.event.model_dump_json(exclude=set(TEXT_FIELDS)).encode()
        head = b'{"_t":"requests","text_logged":false,"logged_at":' + stamp + b","
    else:
        body = item.__pydantic_serializer__.to_json(item)
        head = b'{"_t":"' + TABLE_OF[type(item)].encode() + b'","logged_at":' + stamp + b","
    if extra:
        head += json.dumps(extra, separators=(",", ":"))[1:-1].encode() + b","
    return head + body[1:] + b"\n"


def encode_lenient(item: Any, stamp: bytes, extra: dict[str, Any] | None = None) -> bytes:
    """Like :func:`encode`, for events pydantic cannot serialise (odd objects in ``params`` or
    ``metadata``, lone surrogates in text): unknown objects become their ``str()``, unencodable
    characters become ``?``. The event is kept rather than dropped."""
    event = item.event if isinstance(item, Redacted) else item
    data = event.model_dump(exclude=set(TEXT_FIELDS) if isinstance(item, Redacted) else None)
    data = {"_t": TABLE_OF[type(event)], **({"text_logged": False} if isinstance(item, Redacted) else {}), **data}
    data.update(extra or {})
    body = json.dumps(data, default=str, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")
    return body[:-1] + b',"logged_at":' + stamp + b"}\n"


def encode_batch(items: list[Any], stamp: bytes) -> bytes:
    """WAL lines for a batch of queued events (the hot path of the batch writer)."""
    heads: dict[type, bytes] = {}
    parts: list[bytes] = []
    append = parts.append
    for item in items:
        cls = type(item)
        head = heads.get(cls)
        if head is None:
            if cls is Redacted:
                append(encode(item, stamp))
                continue
            head = heads[cls] = b'{"_t":"' + TABLE_OF[cls].encode() + b'","logged_at":' + stamp + b","
        append(head)
        append(item.__pydantic_serializer__.to_json(item)[1:])
        append(b"\n")
    return b"".join(parts)
