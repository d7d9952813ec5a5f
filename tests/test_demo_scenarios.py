"""The demo scenarios' logic on hand-made answers (no server): the tools scenario's convention checker and its
corrections (as the feedback API validates them), the open scenario's rubric (through the gate's own rubric
loader) and the users' rewrite, the judge figures, each scenario's recipe and settings, and the command line."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from core import paths
from deploy.cli import main
from deploy.demo import SCENARIO_KNOBS, DemoConfig, DemoResult, _recipe, _settings
from deploy.scenarios import Answer, DemoEnv, get_scenario
from deploy.scenarios.judging import judge_lines, win_rate_figures
from deploy.scenarios.open_rubric import restyle, style_score
from deploy.scenarios.reviews import review
from deploy.scenarios.tools import TOOLS, call_scores, correction, tool_request, wanted_call
from feedback.events import corrected_tool_calls
from retrain.evaluators.base import EvalInput, Prediction
from retrain.evaluators.judge import Tally
from retrain.evaluators.rubric import rubric_evaluator
from retrain.recipe import load_recipe


def call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}


# ------------------------------------------------------------------------------------------------ tools


def test_the_convention_normalises_ids_keeps_amounts_numeric_and_escalates_anger() -> None:
    refund = {"name": "refund", "arguments": {"order_id": "ORD-48213", "amount": 17.45}}
    assert wanted_call("refund", "48213", "17.45") == refund
    assert wanted_call("escalate", "10001", "9.10") == {"name": "escalate", "arguments": {"order_id": "ORD-10001"}}
    rng = random.Random(3)
    for _ in range(200):
        item = tool_request(rng)
        text, want = item.messages[-1]["content"], item.want
        digits = want["arguments"]["order_id"].removeprefix("ORD-")
        assert digits in text and "ORD-" not in text  # the customer never writes the house form
        assert item.extra["tools"] == TOOLS and item.metadata["intent"] == want["name"]
        if want["name"] == "escalate":
            assert "!" in text or "furious" in text or "angry" in text or "Unacceptable" in text


def test_held_out_requests_use_order_numbers_never_in_the_traffic() -> None:
    scenario = get_scenario("tools")
    rng = random.Random(0)
    traffic = {scenario.traffic_item(rng).want["arguments"]["order_id"] for _ in range(500)}
    held_out = {i.want["arguments"]["order_id"] for i in scenario.holdout_items(100, 0)}
    assert len(held_out) > 90 and not traffic & held_out


def test_only_the_exact_convention_call_is_rated_good() -> None:
    scenario = get_scenario("tools")
    item = tool_request(random.Random(1))
    item = type(item)(item.messages, wanted_call("refund", "48213", "17.45"), item.extra, item.metadata)
    right = Answer("", (call("refund", '{"amount": 17.450, "order_id": "ORD-48213"}'),))  # key order, 17.45 == 17.450
    assert scenario.rate(item, right).good
    for wrong in [
        Answer("", (call("refund", '{"order_id": "#48213", "amount": 17.45}'),)),  # the id as typed
        Answer("", (call("refund", '{"order_id": "ORD-48213", "amount": "$17.45"}'),)),  # the amount as text
        Answer("", (call("escalate", '{"order_id": "ORD-48213"}'),)),  # the wrong tool
        Answer("I have refunded your order ORD-48213."),  # no call
    ]:
        assert not scenario.rate(item, wrong).good, wrong
    scores = call_scores(item.want, Answer("", (call("refund", '{"order_id": "#48213", "amount": 17.45}'),)))
    assert (scores["tool_name_accuracy"], scores["tool_exact_match"], scores["tool_valid_rate"]) == (1.0, 0.0, 1.0)
    answers = [right, Answer("no call"), Answer("", (call("nope", "{}"),))]
    metrics = scenario.holdout_metrics([item, item, item], answers)
    assert metrics == {"tool_exact_match": pytest.approx(1 / 3), "valid_call_rate": pytest.approx(1 / 3),
                       "tool_name_accuracy": pytest.approx(1 / 3)}  # fmt: skip


def test_the_correction_is_what_the_feedback_api_accepts() -> None:
    stored = corrected_tool_calls(correction(wanted_call("refund", "48213", "17.45")))
    assert stored["content"] is None
    assert [(c["name"], c["arguments"]) for c in stored["tool_calls"]] == [
        ("refund", '{"order_id":"ORD-48213","amount":17.45}')
    ]


# ------------------------------------------------------------------------------------------------- open


def test_the_style_rubric_scores_summary_line_and_length() -> None:
    assert style_score({}, "In short: water it little.\nBasil likes sun and dry soil.") == 1.0
    assert style_score({}, "in SHORT: yes.") == 1.0
    assert style_score({}, "Basil likes sun and dry soil.") == 0.5  # short, no summary line
    assert style_score({}, "In short: " + "word " * 60) == 0.0  # a first line too long, and too long in all
    assert style_score({}, "") == 0.0


def test_the_users_rewrite_always_has_the_house_style() -> None:
    rng = random.Random(0)
    words = ["water", "the", "plant", "often", "because", "basil", "needs", "light", "and", "soil", "drains"]
    for _ in range(300):
        sentences = [" ".join(rng.choices(words, k=rng.randrange(1, 30))) + rng.choice([".", "!", "?"])
                     for _ in range(rng.randrange(1, 6))]  # fmt: skip
        text = " ".join(sentences) + rng.choice(["", " and then the"])  # sometimes cut off mid-sentence
        assert style_score({}, restyle(text)) == 1.0, restyle(text)
    assert restyle("Basil needs sun. Water it twice a week. Pinch the") == (
        "In short: Basil needs sun.\nWater it twice a week."
    )
    assert style_score({}, restyle("")) == 1.0


def test_the_rubric_loads_through_the_gate_and_scores_each_model(tmp_path: Path) -> None:
    recipe_eval = _scenario_recipe("open", tmp_path).eval
    rubric = next(e for e in recipe_eval.evaluators if not isinstance(e, str))
    evaluator = rubric_evaluator(rubric.rubric)
    rows = [{"messages": [{"role": "user", "content": "How do I bake bread?"}]}] * 2
    result = evaluator(EvalInput(rows, {"base": [Prediction("A long answer " * 20), Prediction("Knead it.")],
                                        "candidate": [Prediction("In short: knead."), Prediction("In short: bake.")]},
                                 reference="base"))  # fmt: skip
    assert not result.failures and recipe_eval.primary_metric == evaluator.metric == "rubric:style_score"
    assert result.per_row == {"base": {"rubric:style_score": [0.0, 0.5]},
                              "candidate": {"rubric:style_score": [1.0, 1.0]}}  # fmt: skip


def test_judge_figures_and_the_report_line() -> None:
    tally = Tally(asked=10, unparseable=2)
    figures = win_rate_figures([1.0, 1.0, 0.5, 0.0, None], tally)
    assert (figures["judge_n"], figures["judge_wins"], figures["judge_ties"], figures["judge_losses"]) == (4, 2, 1, 1)
    assert figures["judge_win_rate"] == pytest.approx(2.5 / 4)
    assert figures["judge_win_rate_low"] < 2.5 / 4 < figures["judge_win_rate_high"]
    line = judge_lines(figures, "the served model")[0]
    assert "win rate **62%** (95 % Wilson interval" in line and "2 of 10 verdicts unusable" in line
    assert "no usable verdict" in judge_lines(win_rate_figures([None], Tally(asked=2, unparseable=2)), "x")[0]


# ------------------------------------------------------------------------------------- reviews, recipes, CLI


def test_reviews_traffic_is_what_the_demo_always_sent() -> None:
    """Same seed, same requests as before the scenarios existed (the reviews demo's figures stay comparable)."""
    rng = random.Random(0)
    item = get_scenario("reviews").traffic_item(rng)
    text, label = review(random.Random(0), ["this blender", "the headphones", "my new phone", "the sofa",
                                            "this kettle", "the backpack", "these shoes", "the lamp", "this camera",
                                            "the vacuum", "the keyboard", "this tent"])  # fmt: skip
    assert item.messages == [{"role": "user", "content": f"Review: {text}\nWhat is the verdict on this review?"}]
    assert item.want == label and item.metadata == {"task": "review", "label": label}


def _scenario_recipe(name: str, tmp_path: Path) -> Any:
    """The recipe the scenario's smollm2 demo trains with (its gate on the vLLM at port 8123)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = DemoConfig.for_scenario(name, workdir=tmp_path)
    return load_recipe(
        _recipe(cfg, "/models/smollm2", tmp_path, DemoEnv("http://127.0.0.1:8123", "http://127.0.0.1:8124"))
    )


def test_each_scenario_recipe_and_settings(tmp_path: Path) -> None:
    tools = _scenario_recipe("tools", tmp_path / "tools")
    assert tools.eval.primary_metric == "tool_exact_match" and tools.eval.evaluator_names == ["tool_calls"]
    assert tools.data.prepare.chat_template == "smollm2-tools" and tools.train.max_length >= 1024
    opened = _scenario_recipe("open", tmp_path / "open")
    assert opened.eval.primary_metric == "rubric:style_score" and "judge" in opened.eval.evaluator_names
    judge = opened.eval.judge
    assert (judge.url, judge.model, judge.api_key_env) == ("http://127.0.0.1:8124/v1", "judge", "LORALOOP_DEMO_API_KEY")
    reviews = _scenario_recipe("reviews", tmp_path / "reviews")
    assert reviews.eval.primary_metric == "exact_match" and reviews.eval.max_tokens == 6
    settings = _settings(DemoConfig.for_scenario("tools", workdir=tmp_path), "/models/smollm2", tmp_path)
    assert settings.backends.managed.tool_calling.parser == "pythonic"
    assert settings.backends.managed.tool_calling.chat_template == "smollm2-tools" and "tools" in settings.aliases
    assert load_recipe(settings.cycle.aliases["tools"].recipe).eval.evaluator_names == ["tool_calls"]
    remote = _settings(DemoConfig(scenario="open", vllm_url="http://127.0.0.1:9/", workdir=tmp_path), "/m", tmp_path)
    assert load_recipe(remote.cycle.aliases["open"].recipe).eval.judge.url == f"http://127.0.0.1:{remote.port}/v1"
    shots = remote.aliases["judge"].few_shot  # the judge alias shows the verdict format in the judge's own prompt
    assert [s.assistant for s in shots] == ["A", "B", "TIE"] and shots[0].user.startswith("[Conversation]")


def test_the_command_line_picks_the_scenario(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[DemoConfig] = []

    def fake_run(cfg: DemoConfig) -> DemoResult:
        seen.append(cfg)
        return DemoResult(before_rate=0.0, after_rate=0.9, promoted=f"{cfg.alias}-v1", scenario=cfg.scenario)

    monkeypatch.setattr("deploy.demo.run_demo", fake_run)
    assert main(["demo", "--scenario", "tools", "--preset", "tiny"]) == 0
    assert main(["demo", "--scenario", "open", "--aa"]) == 1  # a promotion in A/A is a failed demo
    tools, opened = seen
    assert (tools.scenario, tools.alias, tools.preset) == ("tools", "tools", "tiny")
    assert tools.workdir == paths.STATE_ROOT / "demo-tiny-tools"
    assert tools.baseline_requests == SCENARIO_KNOBS["tools"]["baseline_requests"]
    assert (opened.scenario, opened.aa, opened.workdir) == ("open", True, paths.STATE_ROOT / "demo-smollm2-open-aa")
    with pytest.raises(SystemExit):
        main(["demo", "--scenario", "chess"])
    with pytest.raises(ValueError, match="unknown scenario 'chess'"):
        DemoConfig(scenario="chess")
