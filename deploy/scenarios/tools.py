"""`--scenario tools`: a shop's support assistant with three tools — `lookup_order`, `refund`, `escalate` — and
users with a house convention the base model does not follow:

* order ids are written `ORD-<digits>`, whatever the customer typed (`#48213`, `ord48213`, `no. 48213`);
* refund amounts are numbers (`amount=17.45`, not `"$17.45"`);
* an angry customer (shouting, "third time", "unacceptable") is escalated to a human: `escalate`, whatever
  they asked for.

Every request offers the tools (`tool_choice: auto`; the managed vLLM parses SmolLM2's pythonic calls,
`backends.managed.tool_calling`); a user gives a thumbs up when the answer is exactly the call the convention
wants and often posts that call as a correction. The recipe renders the training rows with the serving
template (`data.prepare.chat_template: smollm2-tools`) and gates on the tool-call exact match of the holdout
(`eval.evaluators: [tool_calls]`). The held-out metric is the same exact match (with the valid-call rate and
the name accuracy) on requests with order numbers and amounts never seen in the traffic.
"""

from __future__ import annotations

import json
import random
from typing import Any

from retrain.evaluators.base import Prediction, ToolCall
from retrain.evaluators.toolcalls import is_valid_call, offered_schemas, score_row

from .base import Answer, Comparison, DemoEnv, Item, Rating, mean


def _tool(name: str, description: str, **params: dict[str, Any]) -> dict[str, Any]:
    schema = {"type": "object", "properties": params, "required": list(params)}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": schema}}


# short descriptions: the tools make most of every prompt, and prompt tokens are most of the training's cost
_ORDER = {"type": "string"}
TOOLS = [
    _tool("lookup_order", "Status and delivery of an order.", order_id=_ORDER),
    _tool("refund", "Refund money for an order.", order_id=_ORDER, amount={"type": "number"}),
    _tool("escalate", "Hand over to a human agent.", order_id=_ORDER),
]
SYSTEM = "You are the support assistant of an online shop. Use the tools to help the customer."

# How customers write an order number (the convention always wants ORD-<digits>) and an amount (a number).
_ID_FORMS = ["#{d}", "{d}", "ord{d}", "ORD {d}", "no. {d}", "nr {d}"]
_AMOUNT_FORMS = ["${x}", "{x} USD", "{x} dollars", "$ {x}"]
_LOOKUP = ["Where is my order {id}?", "Has order {id} shipped yet?", "Can you track {id} for me?",
           "What is the status of order {id}?", "I'm still waiting for {id}, any news?",
           "When will order {id} arrive?"]  # fmt: skip
_REFUND = ["Please refund {amount} for order {id}.", "I want my money back for {id}: {amount}.",
           "Order {id} arrived broken, refund me {amount} please.", "Refund {amount} on order {id}, thanks.",
           "I returned {id}. Can I get the {amount} back?"]  # fmt: skip
_ANGRY = ["This is the THIRD time I write about order {id}!!! Unacceptable.",
          "I'm furious. Order {id} is a disaster and nobody answers!",
          "Worst service ever!!! Fix order {id} NOW.",
          "I am so angry about {id}. Refund {amount} right now!!!",
          "Unacceptable!!! Where is {id}? I've waited for weeks!"]  # fmt: skip
INTENTS = {"lookup_order": _LOOKUP, "refund": _REFUND, "escalate": _ANGRY}


def order_number(rng: random.Random, held_out: bool = False) -> str:
    """Five digits; the held-out requests' numbers (60000 and up) never occur in the traffic."""
    return str(rng.randrange(60000, 99999) if held_out else rng.randrange(10000, 59999))


def amount(rng: random.Random) -> str:
    return f"{rng.randrange(5, 200)}.{rng.randrange(1, 100):02d}"  # never .00: 17.0 and 17 would differ as JSON


def wanted_call(intent: str, digits: str, value: str) -> dict[str, Any]:
    """The call the convention wants: ids as ORD-<digits>, amounts as numbers, anger escalated."""
    args: dict[str, Any] = {"order_id": f"ORD-{digits}"}
    if intent == "refund":
        args["amount"] = float(value)
    return {"name": intent, "arguments": args}


def tool_request(rng: random.Random, held_out: bool = False) -> Item:
    """One customer message and the call the convention wants for it."""
    intent = rng.choice(list(INTENTS))
    digits, value = order_number(rng, held_out), amount(rng)
    raw_id = rng.choice(_ID_FORMS).format(d=digits)
    raw_amount = rng.choice(_AMOUNT_FORMS).format(x=value)
    text = rng.choice(INTENTS[intent]).format(id=raw_id, amount=raw_amount)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
    return Item(messages, want=wanted_call(intent, digits, value), extra={"tools": TOOLS, "tool_choice": "auto"},
                metadata={"task": "support", "intent": intent})  # fmt: skip


def prediction(answer: Answer) -> Prediction:
    """An answer as the gate's tool-call metrics read it."""
    calls = []
    for c in answer.tool_calls:
        fn = c.get("function") or {}
        args = fn.get("arguments")
        calls.append(ToolCall(str(fn.get("name")), args if isinstance(args, str) else json.dumps(args)))
    return Prediction(answer.text, tuple(calls))


def call_scores(want: dict[str, Any], answer: Answer) -> dict[str, float | None]:
    """The gate's tool metrics (retrain.evaluators.toolcalls) of one answer against the wanted call."""
    return score_row({"tools": TOOLS, "reference_tool_calls": [want]}, prediction(answer))


def answered_with_valid_call(answer: Answer) -> bool:
    """The answer is tool calls only, each to an offered tool with arguments its schema accepts."""
    calls = prediction(answer).tool_calls
    return bool(calls) and all(is_valid_call(c, offered_schemas({"tools": TOOLS})) for c in calls)


def correction(want: dict[str, Any]) -> dict[str, Any]:
    """The wanted call as `correction` feedback (the assistant message the user wanted)."""
    return {"content": None, "tool_calls": [{"type": "function", "function": want}]}


class ToolsScenario:
    name = "tools"
    metric = "tool_exact_match"
    metric_title = "tool-call exact match"
    holdout_noun = "support requests"
    correction_rate = 0.8
    show_gate = True

    def __init__(self, preset: str = "smollm2") -> None:
        self.preset = preset

    def aliases(self, alias: str) -> dict[str, dict[str, Any]]:
        return {alias: {"defaults": {"temperature": 0.0, "max_tokens": 32}}}

    def tool_calling(self) -> dict[str, Any] | None:
        return {"parser": "pythonic", "chat_template": "smollm2-tools"}

    def tune_recipe(self, recipe: dict[str, Any], preset: str, env: DemoEnv) -> None:
        recipe["eval"].update({"max_tokens": 32, "evaluators": ["tool_calls"], "primary_metric": "tool_exact_match"})
        # templated traffic: near-duplicate removal would keep one request per phrasing; the rows must be rendered
        # with the template vLLM serves (tools in the system turn, calls as `[refund(order_id="ORD-1", ...)]`)
        recipe["data"]["prepare"].update({"chat_template": "smollm2-tools", "dedupe": {"near": False}})
        recipe["train"]["max_length"] = 1024  # the tools' schemas: ~270 prompt tokens on SmolLM2, ~580 on tiny
        if preset == "smollm2":  # ~130 corrections: one pass is enough (40 steps: 100 % on the gate, 95 % held out)
            recipe["train"].update({"learning_rate": 1.5e-3, "max_steps": 16})
        else:  # the tiny model learns no convention in any number of steps: the tiny run checks the plumbing
            recipe["train"]["max_steps"] = 20

    def traffic_item(self, rng: random.Random) -> Item:
        return tool_request(rng)

    def holdout_items(self, n: int, seed: int) -> list[Item]:
        rng = random.Random(seed + 1)
        return [tool_request(rng, held_out=True) for _ in range(n)]

    def rate(self, item: Item, answer: Answer) -> Rating:
        return Rating(call_scores(item.want, answer)["tool_exact_match"] == 1.0, correction=correction(item.want))

    def holdout_metrics(self, items: list[Item], answers: list[Answer]) -> dict[str, float]:
        scores = [call_scores(i.want, a) for i, a in zip(items, answers, strict=True)]
        return {
            "tool_exact_match": mean([float(s["tool_exact_match"] or 0.0) for s in scores]),
            "valid_call_rate": mean([float(answered_with_valid_call(a)) for a in answers]),
            "tool_name_accuracy": mean([float(s["tool_name_accuracy"] or 0.0) for s in scores]),
        }

    def metric_titles(self) -> dict[str, str]:
        return {"tool_exact_match": self.metric_title, "valid_call_rate": "valid-call rate",
                "tool_name_accuracy": "tool-name accuracy"}  # fmt: skip

    def compare(self, items: list[Item], before: list[Answer], after: list[Answer], env: DemoEnv) -> Comparison:
        return Comparison()


__all__ = ["INTENTS", "SYSTEM", "TOOLS", "ToolsScenario", "call_scores", "correction", "tool_request", "wanted_call"]
