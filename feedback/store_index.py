"""In-memory indexes of a writer: feedback ids it stored (idempotency) and recent requests (labels)."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import duckdb

from feedback.events import FeedbackEvent, RequestEvent
from feedback.schema import read_wal_sql, sql_list, sql_str
from feedback.segments import new_connection
from feedback.wal import list_segments, list_wals

Served = tuple[str, str | None, str | None, str | None]


class RecentRequests:
    """request_id → (alias, experiment_id, arm, adapter), the number of choices and the names of the tools
    offered, of the last ``capacity`` requests submitted here (what feedback on them is checked against)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._map: dict[str, tuple[Served, int, frozenset[str]]] = {}

    def add(self, event: RequestEvent) -> None:
        """Remember what served ``event`` (amortised O(1); old entries are dropped in bulk)."""
        if not self.capacity:
            return
        m = self._map
        served = (event.alias, event.experiment_id, event.arm, event.adapter)
        m[event.request_id] = (served, len(event.choices) if event.choices else 1, _tool_names(event.tools))
        if len(m) > 2 * self.capacity:
            self._map = dict(list(m.items())[-self.capacity :])

    def get(self, request_id: str) -> Served | None:
        """What served ``request_id``, if it was submitted here recently."""
        entry = self._map.get(request_id)
        return entry[0] if entry is not None else None

    def choices(self, request_id: str) -> int | None:
        """How many choices ``request_id`` returned, if it was submitted here recently."""
        entry = self._map.get(request_id)
        return entry[1] if entry is not None else None

    def tools(self, request_id: str) -> frozenset[str] | None:
        """The function names ``request_id`` offered (empty: none), if it was submitted here recently."""
        entry = self._map.get(request_id)
        return entry[2] if entry is not None else None


_NO_TOOLS: frozenset[str] = frozenset()


def _tool_names(tools: list[dict[str, Any]] | None) -> frozenset[str]:
    if not tools:
        return _NO_TOOLS
    return frozenset(str((t.get("function") or {}).get("name")) for t in tools if isinstance(t, dict))


class FeedbackIndex:
    """Every feedback id this writer has stored, plus the recent events themselves.

    Callers hold the store's condition lock around get/reserve/target/done/forget.
    """

    def __init__(self, recent: int = 10_000) -> None:
        self._ids: set[str] = set()
        self._inflight: dict[str, int] = {}
        self._recent: OrderedDict[str, FeedbackEvent] = OrderedDict()
        self._recent_cap = recent

    def load(self, root: Path, writer: str) -> None:
        """Load the ids already stored in this writer's directory (after crash recovery)."""
        segs = [str(s.path) for s in list_segments(root, "feedback", writer)]
        wals = [str(w.path) for w in list_wals(root, writer)]
        parts = []
        if segs:
            parts.append(f"SELECT feedback_id FROM read_parquet({sql_list(segs)})")
        if wals:
            parts.append(f"SELECT feedback_id FROM {read_wal_sql(wals)} WHERE _t = 'feedback'")
        if not parts:
            return
        con = new_connection()
        try:
            rows = con.execute(" UNION ALL ".join(parts)).fetchnumpy()["feedback_id"]
            self._ids.update(str(x) for x in rows)
        finally:
            con.close()

    def get(self, feedback_id: str) -> FeedbackEvent | bool | None:
        """The stored event (recent ones), True (older ones), or None when unknown."""
        event = self._recent.get(feedback_id)
        if event is not None:
            return event
        return True if feedback_id in self._ids else None

    def reserve(self, event: FeedbackEvent, target: int) -> None:
        """Record a new id that becomes durable with commit cycle ``target``."""
        self._ids.add(event.feedback_id)
        self._inflight[event.feedback_id] = target
        self._recent[event.feedback_id] = event
        if len(self._recent) > self._recent_cap:
            self._recent.popitem(last=False)

    def target(self, feedback_id: str) -> int:
        """Commit cycle to wait for (0 when already durable)."""
        return self._inflight.get(feedback_id, 0)

    def done(self, feedback_id: str) -> None:
        """The id's commit succeeded."""
        self._inflight.pop(feedback_id, None)

    def forget(self, feedback_id: str) -> None:
        """The id's commit failed: the client was not acknowledged and will retry."""
        self._inflight.pop(feedback_id, None)
        self._ids.discard(feedback_id)
        self._recent.pop(feedback_id, None)

    @staticmethod
    def lookup(root: Path, directory: Path, feedback_id: str) -> FeedbackEvent | None:
        """Read an older stored feedback event back from this writer's files."""
        segs = [str(s.path) for s in list_segments(root, "feedback", directory.name)]
        wals = [str(w.path) for w in list_wals(root, directory.name)]
        cols = (
            'feedback_id, request_id, ts, kind, CAST(value AS VARCHAR) AS value, "user", source, '
            "CAST(metadata AS VARCHAR) AS metadata, logged_at"
        )
        parts = []
        if segs:
            parts.append(f"SELECT {cols} FROM read_parquet({sql_list(segs)})")
        if wals:
            parts.append(f"SELECT {cols} FROM {read_wal_sql(wals)} WHERE _t = 'feedback'")
        if not parts:
            return None
        con = new_connection()
        try:
            row = con.execute(
                f"SELECT * FROM ({' UNION ALL '.join(parts)}) WHERE feedback_id = {sql_str(feedback_id)} "
                "ORDER BY logged_at LIMIT 1"
            ).fetchone()
        except duckdb.Error:
            return None
        finally:
            con.close()
        if row is None:
            return None
        fid, rid, ts, kind, value, user, source, metadata, _ = row
        return FeedbackEvent(
            feedback_id=fid,
            request_id=rid,
            ts=ts,
            kind=kind,
            value=json.loads(value) if value is not None else None,
            user=user,
            source=source,
            metadata=json.loads(metadata) if metadata else {},
        )
