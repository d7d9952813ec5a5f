"""Thin adapters from the event store's export (or Parquet/JSONL files) to plain row dicts.

A *normalised* row has: ``kind`` ('sft' | 'pairs'), ``row_id``, ``origin``, ``messages`` (list of
{role, content} — the prompt conversation without the answer; assistant turns may carry ``tool_calls``,
``tool`` turns the results) or ``prompt`` (completions text), ``completion`` (SFT) or ``chosen`` /
``rejected`` (pairs), each answer's tool calls in ``<answer>_tool_calls`` (a list of ``{id, name,
arguments}``, ``arguments`` JSON text; None for a text answer), ``tools`` (the request's tool definitions or
None), ``request_id``, ``available_at`` (str), ``metadata`` (dict), ``labels`` (list[str]) and every other
exported column unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

ANSWER_FIELDS: dict[str, tuple[str, ...]] = {"sft": ("completion",), "pairs": ("chosen", "rejected")}


@dataclass
class SourceData:
    """Rows read from one export, with the watermark to pass as ``since`` next time (None for files)."""

    sft: list[dict[str, Any]]
    pairs: list[dict[str, Any]]
    watermark: datetime | None = None


def content_id(*parts: str) -> str:
    """A stable id (32 hex characters) of some texts."""
    return hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def calls_text(calls: list[dict[str, Any]] | None) -> str:
    """Tool calls as one line each, ``name(arguments)``: how they count in dedupe keys and text checks."""
    return "\n".join(f"{c.get('name')}({c.get('arguments')})" for c in calls or ())


def _joined(text: Any, calls: list[dict[str, Any]] | None) -> str:
    parts = [str(text or ""), calls_text(calls)]
    return "\n".join(p for p in parts if p)


def prompt_text(row: dict[str, Any]) -> str:
    """The prompt as one string: 'role: content' lines for chat rows (tool calls included, then the names of
    the tools offered), the text for completions rows."""
    messages = row.get("messages")
    if not messages:
        return str(row.get("prompt") or "")
    lines = [f"{m.get('role', '')}: {_joined(m.get('content'), m.get('tool_calls'))}" for m in messages]
    names = [str((t.get("function") or {}).get("name")) for t in row.get("tools") or () if isinstance(t, dict)]
    return "\n".join([*lines, *([f"tools: {', '.join(names)}"] if names else [])])


def answer_texts(row: dict[str, Any]) -> list[str]:
    """The answers of a row: [completion] (SFT) or [chosen, rejected] (pairs), tool calls as lines."""
    return [_joined(row.get(f), row.get(f"{f}_tool_calls")) for f in ANSWER_FIELDS[row.get("kind", "sft")]]


def _map_arguments(arguments: str, fn: Callable[[str], str]) -> str:
    """``fn`` on every string inside a call's JSON arguments (the JSON stays valid); on the text when it is not
    JSON."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return fn(arguments)

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            return fn(v)
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        return v

    return json.dumps(walk(value), ensure_ascii=False, separators=(",", ":"))


def _map_calls(calls: Any, fn: Callable[[str], str]) -> Any:
    if not isinstance(calls, list):
        return calls
    return [{**c, "arguments": _map_arguments(str(c.get("arguments") or ""), fn)} for c in calls]


def map_texts(row: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    """A copy of ``row`` with ``fn`` applied to every message content, the text prompt, the answers and every
    string in tool-call arguments."""
    out = dict(row)
    if out.get("messages"):
        out["messages"] = [_map_message(m, fn) for m in out["messages"]]
    if isinstance(out.get("prompt"), str):
        out["prompt"] = fn(out["prompt"])
    for f in ANSWER_FIELDS[out.get("kind", "sft")]:
        if isinstance(out.get(f), str):
            out[f] = fn(out[f])
        if out.get(f"{f}_tool_calls"):
            out[f"{f}_tool_calls"] = _map_calls(out[f"{f}_tool_calls"], fn)
    return out


def _map_message(m: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    out = {**m, "content": fn(m["content"])}
    if m.get("tool_calls"):
        out["tool_calls"] = [_map_openai_call(c, fn) for c in m["tool_calls"]]
    return out


def _map_openai_call(call: Any, fn: Callable[[str], str]) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    return {**call, "function": {**function, "arguments": _map_arguments(function["arguments"], fn)}}


def row_texts(row: dict[str, Any]) -> list[str]:
    """Every text of a row: message contents (or the text prompt), then the answers."""
    texts = [m["content"] for m in row["messages"]] if row.get("messages") else [str(row.get("prompt") or "")]
    return texts + answer_texts(row)


def _json_value(value: Any) -> Any:
    if isinstance(value, str | bytes):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _content(value: Any) -> str | None:
    """Message content as text: strings as they are, OpenAI content parts joined (text parts only)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = [p.get("text") for p in value if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(value) and all(isinstance(t, str) for t in texts):
            return "\n".join(t for t in texts if isinstance(t, str))
    return None


def _messages(value: Any) -> list[dict[str, Any]] | None:
    value = _json_value(value)
    if not isinstance(value, list) or not value:
        return None
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return None
        content = _content(m.get("content"))
        if content is None and m.get("content") is None and m.get("role") == "assistant" and m.get("tool_calls"):
            content = ""  # an assistant turn that only called tools
        if content is None:
            return None
        out.append({**m, "content": content})
    return out


def _tool_calls(value: Any) -> list[dict[str, Any]] | None:
    """An answer's tool calls as ``[{id, name, arguments}]`` (None when there are none or they are malformed)."""
    value = _json_value(value)
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) and c["name"] for c in value):
        return None
    return [{"id": c.get("id"), "name": c["name"], "arguments": str(c.get("arguments") or "{}")} for c in value]


def _answers(out: dict[str, Any], kind: str) -> bool:
    """Normalise the answers and their tool calls in place; False when an answer is missing."""
    for f in ANSWER_FIELDS[kind]:
        calls = _tool_calls(out.get(f"{f}_tool_calls"))
        out[f"{f}_tool_calls"] = calls
        if calls is not None and out.get(f) is None:
            out[f] = ""  # a call with no text
        if not isinstance(out.get(f), str):
            return False
    return True


def normalize_row(row: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The normalised copy of an exported / seed row, or None when it has no usable prompt or answer."""
    out = dict(row)
    out["kind"] = kind
    given = row.get("messages") not in (None, [], "", "null", "[]")
    messages = _messages(row.get("messages")) if given else None
    prompt = row.get("prompt")
    if given and messages is None:
        return None  # malformed conversation (non-text content, missing roles)
    if messages is None and not isinstance(prompt, str):
        return None
    if not _answers(out, kind):
        return None
    tools = _json_value(row.get("tools"))
    out["tools"] = tools if isinstance(tools, list) and tools else None
    response_format = _json_value(row.get("response_format"))
    out["response_format"] = response_format if isinstance(response_format, dict) else None
    tool_choice = _json_value(row.get("tool_choice"))
    out["tool_choice"] = tool_choice if isinstance(tool_choice, dict | str) and out["tools"] else None
    if messages and messages[-1].get("role") == "assistant" and messages[-1]["content"] == out.get("completion"):
        messages = messages[:-1]  # the answer was logged with the prompt; the answer is `completion`
        if not messages:
            return None
    out["messages"] = messages
    out["prompt"] = None if messages else prompt
    key = content_id(kind, prompt_text(out), *answer_texts(out))
    if kind == "pairs" and not out.get("request_id"):
        out["request_id"] = out.get("chosen_request_id")
    out["request_id"] = str(out.get("request_id") or f"derived-{key}")
    out["row_id"] = str(out.get("row_id") or f"derived-{key}")
    out["origin"] = str(out.get("origin") or "unknown")
    at = out.get("available_at")
    out["available_at"] = at.isoformat() if isinstance(at, datetime) else str(at or "")
    metadata = _json_value(out.get("metadata"))
    out["metadata"] = metadata if isinstance(metadata, dict) else {}
    labels = _json_value(out.get("labels"))
    out["labels"] = [str(x) for x in labels] if isinstance(labels, list) else []
    return out


def normalize_rows(rows: list[dict[str, Any]], kind: str) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Normalised rows sorted by (available_at, row_id), and the count of unusable rows (`invalid_row`)."""
    out: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    for row in rows:
        norm = normalize_row(row, kind) if isinstance(row, dict) else None
        if norm is None:
            dropped["invalid_row"] += 1
        else:
            out.append(norm)
    out.sort(key=lambda r: (r["available_at"], r["row_id"]))
    return out, dropped


def read_file(path: Path | str) -> list[dict[str, Any]]:
    """Rows of a JSONL (`.jsonl`, `.json`) or Parquet file."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
        return rows
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_export_dir(path: Path | str) -> SourceData:
    """The `sft` and `pairs` files of an export directory (Parquet preferred over JSONL)."""
    path = Path(path)
    found: dict[str, list[dict[str, Any]]] = {}
    for name in ("sft", "pairs"):
        files = [path / f"{name}.parquet", path / f"{name}.jsonl"]
        existing = [f for f in files if f.is_file()]
        found[name] = read_file(existing[0]) if existing else []
    return SourceData(found["sft"], found["pairs"])


def load_seed_dataset(path: Path | str) -> SourceData:
    """A fixed seed dataset: rows with `chosen`/`rejected` are pairs, the others SFT; origin defaults to 'seed'."""
    sft: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    for row in read_file(path):
        row = {"origin": "seed", **row}
        (pairs if "chosen" in row and "rejected" in row else sft).append(row)
    return SourceData(sft, pairs)


def export_from_store(
    root: Path | str, out_dir: Path | str, *, since: datetime | None = None, **kwargs: Any
) -> SourceData:
    """Export from the event store with ``feedback.export.export_training_data`` (JSONL) and read it back."""
    from feedback.export import export_training_data

    result = export_training_data(root, out_dir, since=since, formats=("jsonl",), as_datasets=False, **kwargs)
    data = load_export_dir(out_dir)
    data.watermark = result.watermark
    return data


__all__ = [
    "ANSWER_FIELDS",
    "SourceData",
    "answer_texts",
    "content_id",
    "export_from_store",
    "load_export_dir",
    "load_seed_dataset",
    "map_texts",
    "normalize_row",
    "normalize_rows",
    "prompt_text",
    "read_file",
    "row_texts",
]
