"""A /v1/responses request as the request log keeps it: in chat's shape, so that export, training and the
reports read it like any chat request — `instructions` as the system message, input items as messages
(function calls as an assistant message's `tool_calls`, their outputs as `tool` messages), function tools,
`tool_choice` and `text.format` as chat's `tools`, `tool_choice` and `response_format`."""

from __future__ import annotations

import json
from typing import Any

#: Responses' input content parts -> chat's (media parts become chat's, which the log keeps as references)
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


def _part(part: Any) -> Any:
    if not isinstance(part, dict):
        return part
    kind = part.get("type")
    if kind in _TEXT_PARTS:
        return {"type": "text", "text": part.get("text") if kind != "refusal" else part.get("refusal")}
    if kind == "input_image":
        return {"type": "image_url", "image_url": {"url": part.get("image_url") or part.get("file_id")}}
    if kind == "input_file":
        file = {k: part[k] for k in ("file_data", "file_id", "filename") if k in part}
        return {"type": "file", "file": file}
    if kind == "input_audio":
        return {"type": "input_audio", "input_audio": part.get("input_audio")}
    return part


def _content(content: Any) -> Any:
    """Plain text stays text; a list of parts is chat's list of parts (all text: joined into one string)."""
    if not isinstance(content, list):
        return content
    parts = [_part(p) for p in content]
    if all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
        return "".join(str(p.get("text") or "") for p in parts)
    return parts


def _call(item: dict[str, Any]) -> dict[str, Any]:
    function = {"name": item.get("name"), "arguments": item.get("arguments")}
    return {"id": item.get("call_id") or item.get("id"), "type": "function", "function": function}


def _output_text(output: Any) -> Any:
    return output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)


def chat_messages(instructions: Any, items: Any) -> list[dict[str, Any]]:
    """The conversation of a Responses request as chat messages."""
    messages: list[dict[str, Any]] = []
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role"), "content": _content(item.get("content"))})
        elif kind == "function_call":
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(_call(item))  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [_call(item)]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": _output_text(item.get("output"))})  # fmt: skip
    return messages


def chat_tools(tools: Any) -> list[dict[str, Any]] | None:
    if not isinstance(tools, list):
        return None
    return [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
            for t in tools if isinstance(t, dict)]  # fmt: skip


def chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def chat_response_format(text: Any) -> dict[str, Any] | None:
    """`text.format` as chat's `response_format` (`json_schema`'s name, schema and strict go into `json_schema`)."""
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") != "json_schema":
        return fmt
    return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}


#: request fields that keep their name in chat; `max_output_tokens` is chat's `max_tokens`
_SAME_NAME = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_logprobs", "top_k")


def chat_view(body: dict[str, Any]) -> dict[str, Any]:
    """The body of a Responses request (as sent to vLLM) in chat's shape, for the request log."""
    view: dict[str, Any] = {k: body[k] for k in _SAME_NAME if k in body}
    if body.get("max_output_tokens") is not None:
        view["max_tokens"] = body["max_output_tokens"]
    view["messages"] = chat_messages(body.get("instructions"), body.get("input"))
    tools = chat_tools(body.get("tools"))
    if tools:
        view["tools"] = tools
    if "tool_choice" in body:
        view["tool_choice"] = chat_tool_choice(body["tool_choice"])
    response_format = chat_response_format(body.get("text"))
    if response_format is not None:
        view["response_format"] = response_format
    return view
