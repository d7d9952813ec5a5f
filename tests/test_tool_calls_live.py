"""Tool calls through the gateway to the session's vLLM (tool calling from `backends.managed.tool_calling`), read by
the official `openai` client in strict mode: a strict function tool from a pydantic model, a named tool choice, the
call's arguments parsed back into the model — streamed and not."""

from __future__ import annotations

from typing import Literal

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionNamedToolChoiceParam
from pydantic import BaseModel

from tests.conftest import API_KEY, LiveGateway

pytestmark = pytest.mark.integration


class LookupOrder(BaseModel):
    """Find an order by its id."""

    # an enum keeps the schema-constrained answer short whatever the tiny model's weights
    order_id: Literal["A-16", "A-17"]


TOOL = openai.pydantic_function_tool(LookupOrder, name="lookup_order")
NAMED: ChatCompletionNamedToolChoiceParam = {"type": "function", "function": {"name": "lookup_order"}}
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Where is my order A-17?"}]


@pytest.fixture(scope="module")
def client(live_gateway: LiveGateway) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{live_gateway.url}/v1", api_key=API_KEY, max_retries=0, _strict_response_validation=True
    )


def test_a_named_tool_call_parses_strictly(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.parse(
        model="tiny", messages=MESSAGES, tools=[TOOL], tool_choice=NAMED, max_tokens=48, temperature=0
    )
    answer = raw.parse()
    assert answer.id == raw.headers["x-request-id"] and answer.model == "tiny"
    call = answer.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.type == "function" and call.function.name == "lookup_order" and call.id
    assert isinstance(call.function.parsed_arguments, LookupOrder)  # the JSON arguments, validated by the client


def test_a_streamed_tool_call_parses_strictly(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model="tiny", messages=MESSAGES, tools=[TOOL], tool_choice=NAMED, max_tokens=48, temperature=0
    ) as stream:
        deltas = [e for e in stream if e.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "lookup_order" and isinstance(call.function.parsed_arguments, LookupOrder)
    assert len(deltas) > 1 and "".join(d.arguments_delta for d in deltas) == call.function.arguments
