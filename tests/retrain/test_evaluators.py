"""The gate's evaluators on hand-made rows and answers: the judge (strict verdicts, both orders, Wilson interval
against the libraries, fail-closed cases, judge-human agreement), chrF / ROUGE-L against their libraries, tool-call
and schema metrics, rubric plug-ins (loading errors, bad scores), and the gate deciding on each of them per slice."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from importlib.metadata import EntryPoint
from typing import Any

import httpx
import pytest

from feedback.events import ChoiceLog, FeedbackEvent, RequestEvent, ToolCallLog
from retrain.evaluate import gate
from retrain.evaluators import rubric as rubric_mod
from retrain.evaluators.base import METRICS, EvalInput, Prediction, ToolCall
from retrain.evaluators.judge import (
    HumanPair,
    JudgeEvaluator,
    JudgeReply,
    combine,
    human_pairs_from_feedback,
    judge_human_agreement,
    openai_judge,
    parse_verdict,
    wilson_interval,
)
from retrain.evaluators.reference import chrf, preferred_loss_scores, rouge_l
from retrain.evaluators.registry import build_evaluators
from retrain.evaluators.schema import score_schema
from retrain.evaluators.toolcalls import field_f1, score_row
from retrain.generation import prediction_from, request_for
from retrain.recipe import EvalSection, EvaluatorName, JudgeSection, RecipeError, load_recipe

JUDGE = {"url": "http://judge.invalid/v1", "model": "judge-model"}


# -------------------------------------------------------------------------------------------------- judge


def test_verdicts_are_parsed_strictly() -> None:
    assert [parse_verdict(r) for r in ("A", " B\n", "TIE", "\tTIE ")] == ["A", "B", "TIE", "TIE"]
    for garbage in ("a", "A.", "Answer: A", "TIE TIE", "tie", "AB", "", None, "B is better"):
        assert parse_verdict(garbage) is None, garbage


def test_the_two_orders_combine_into_win_loss_or_tie() -> None:
    # first: candidate shown as A; second: candidate shown as B
    assert combine("A", "B") == 1.0 and combine("B", "A") == 0.0
    assert combine("A", "A") == 0.5  # position bias: the orders disagree
    assert combine("TIE", "TIE") == 0.5 and combine("A", "TIE") == 0.5
    assert combine(None, "B") is None and combine("A", None) is None


def test_wilson_interval_matches_the_libraries() -> None:
    from scipy.stats import binomtest
    from statsmodels.stats.proportion import proportion_confint

    for k, n in ((7, 10), (0, 12), (30, 30), (55, 100)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
    # ties count as halves: a non-integer count, as statsmodels takes it
    assert wilson_interval(7.5, 10, 0.9) == pytest.approx(proportion_confint(7.5, 10, alpha=0.1, method="wilson"))
    assert wilson_interval(0, 0) == (0.0, 1.0)


class FakeJudge:
    """Prefers the answer that says 'good' (TIE when both or neither do), or answers a fixed reply."""

    def __init__(self, fixed: str | None = None, error: str | None = None) -> None:
        self.fixed, self.error = fixed, error
        self.asked: list[tuple[str, str]] = []

    def __call__(self, batch: Sequence[list[dict[str, str]]]) -> list[JudgeReply]:
        out = []
        for messages in batch:
            user = messages[-1]["content"]
            a = user.split("[Answer A]\n", 1)[1].split("\n\n[Answer B]", 1)[0]
            b = user.split("[Answer B]\n", 1)[1].split("\n\nWhich answer", 1)[0]
            self.asked.append((a, b))
            if self.error is not None:
                out.append(JudgeReply(None, self.error))
            elif self.fixed is not None:
                out.append(JudgeReply(self.fixed))
            else:
                out.append(JudgeReply("TIE" if ("good" in a) == ("good" in b) else ("A" if "good" in a else "B")))
        return out


def _judge_input(cand: list[str], champ: list[str], rows: list[dict[str, Any]] | None = None) -> EvalInput:
    rows = rows or [{"messages": [{"role": "user", "content": f"q{i}"}], "answer": "x"} for i in range(len(cand))]
    preds = {"candidate": [Prediction(t) for t in cand], "champion": [Prediction(t) for t in champ]}
    return EvalInput(rows, preds, "candidate", "champion")


def test_judge_asks_both_orders_and_scores_wins_ties_losses() -> None:
    fake = FakeJudge()
    cfg = JudgeSection(**JUDGE)
    data = _judge_input(["good 0", "good 1", "meh 2", "meh 3"], ["meh", "good", "good", "meh"])
    res = JudgeEvaluator(cfg, fake)(data)
    # every prompt asked twice, the answers swapped
    assert len(fake.asked) == 8
    for i in range(4):
        assert fake.asked[2 * i] == fake.asked[2 * i + 1][::-1]
        assert fake.asked[2 * i][0].startswith(("good", "meh")) and str(i) in fake.asked[2 * i][0]
    assert res.per_row["candidate"]["judge_win_rate"] == [1.0, 0.5, 0.0, 0.5]
    assert res.per_row["champion"]["judge_win_rate"] == [0.0, 0.5, 1.0, 0.5]
    d = res.details
    assert (d["wins"], d["ties"], d["losses"], d["n"], d["asked"]) == (1, 2, 1, 4, 8)
    assert d["win_rate"] == 0.5 and (d["win_rate_low"], d["win_rate_high"]) == pytest.approx(wilson_interval(2, 4))
    assert d["prompt_version"] == "pairwise-v1" and len(d["prompt_sha256"]) == 64 and not res.failures


def test_a_position_biased_judge_gives_ties_not_wins() -> None:
    res = JudgeEvaluator(JudgeSection(**JUDGE), FakeJudge(fixed="A"))(_judge_input(["good"] * 3, ["meh"] * 3))
    assert res.per_row["candidate"]["judge_win_rate"] == [0.5, 0.5, 0.5] and not res.failures


@pytest.mark.parametrize(
    ("fake", "says"),
    [(FakeJudge(fixed="I prefer A"), "replies not exactly A, B or TIE; e.g. reply 'I prefer A'"),
     (FakeJudge(error="ConnectError: refused"), "8 endpoint errors")],
)  # fmt: skip
def test_a_judge_that_answers_garbage_or_errors_fails_closed(fake: FakeJudge, says: str) -> None:
    res = JudgeEvaluator(JudgeSection(**JUDGE), fake)(_judge_input(["good"] * 4, ["meh"] * 4))
    assert res.details["n"] == 0 and len(res.failures) == 1
    assert "8 of 8 verdicts unusable" in res.failures[0] and says in res.failures[0]
    assert "the gate cannot judge" in res.failures[0]


def test_a_few_unparseable_verdicts_are_tolerated_up_to_the_limit() -> None:
    class Flaky(FakeJudge):
        def __call__(self, batch: Sequence[list[dict[str, str]]]) -> list[JudgeReply]:
            out = super().__call__(batch)
            out[0] = JudgeReply("A, clearly")
            return out

    data = _judge_input(["good"] * 10, ["meh"] * 10)
    res = JudgeEvaluator(JudgeSection(**JUDGE, max_invalid_fraction=0.1), Flaky())(data)
    assert not res.failures and res.details["unparseable"] == 1 and res.details["n"] == 9
    assert res.per_row["candidate"]["judge_win_rate"][0] is None
    strict = JudgeEvaluator(JudgeSection(**JUDGE, max_invalid_fraction=0.0), Flaky())(data)
    assert strict.failures and "1 of 20 verdicts unusable" in strict.failures[0]


def _transport(handler: Any) -> httpx.AsyncBaseTransport:
    return httpx.MockTransport(handler)


def test_the_openai_client_sends_the_key_and_reports_http_and_shape_errors() -> None:
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("authorization"), json.loads(request.content)))
        body = json.loads(request.content)
        if body["messages"][-1]["content"] == "500":
            return httpx.Response(500, text="overloaded")
        if body["messages"][-1]["content"] == "shape":
            return httpx.Response(200, json={"unexpected": True})
        return httpx.Response(200, json={"choices": [{"message": {"content": " TIE "}}]})

    ask = openai_judge("http://judge.test/v1/", "m", api_key="sk-1", max_tokens=4, concurrency=2, timeout_s=5,
                       transport=_transport(handler))  # fmt: skip
    replies = ask([[{"role": "user", "content": c}] for c in ("ok", "500", "shape")])
    assert replies[0] == JudgeReply(" TIE ") and parse_verdict(replies[0].text) == "TIE"
    assert replies[1].error == "HTTP 500: overloaded"
    assert replies[2].error is not None and replies[2].error.startswith("not a chat completion")
    assert {(p, a) for p, a, _ in seen} == {("/v1/chat/completions", "Bearer sk-1")}
    assert all(b["model"] == "m" and b["temperature"] == 0.0 and b["max_tokens"] == 4 for _, _, b in seen)


def test_a_judge_endpoint_that_is_down_fails_the_gate_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = EvalSection(evaluators=["exact_match", "judge"], primary_metric="judge_win_rate",
                      judge={"url": "http://127.0.0.1:9/v1", "model": "m", "timeout_s": 5})  # fmt: skip
    rows = [{"prompt": f"q{i}", "answer": "a", "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]
    preds = {n: [Prediction("a")] * 3 for n in ("base", "champion", "candidate")}
    result = gate(cfg, holdout=rows, pairs=[], predictions=preds)
    assert not result.passed and "endpoint errors" in result.reasons[0] and "ConnectError" in result.reasons[0]
    assert "FAILED" in result.table()

    monkeypatch.delenv("JUDGE_KEY_FOR_TEST", raising=False)
    keyed = cfg.model_copy(update={"judge": cfg.judge.model_copy(update={"api_key_env": "JUDGE_KEY_FOR_TEST"})})
    result = gate(keyed, holdout=rows, pairs=[], predictions=preds)
    assert not result.passed and "JUDGE_KEY_FOR_TEST" in result.reasons[0] and "unset" in result.reasons[0]


def _slice_rows(n: int = 20) -> list[dict[str, Any]]:
    return [{"prompt": f"q{i}", "answer": "ref", "messages": [{"role": "user", "content": f"q{i}"}],
             "slices": {"lang": "en" if i < n // 2 else "fr"}} for i in range(n)]  # fmt: skip


def test_the_gate_passes_on_the_wilson_lower_bound_and_gates_slices_on_the_judge() -> None:
    rows = _slice_rows(20)
    cfg = EvalSection(evaluators=["judge"], primary_metric="judge_win_rate", judge={**JUDGE, "threshold": 0.5})
    champion = [Prediction("meh")] * 20
    better = {"base": champion, "champion": champion, "candidate": [Prediction("good")] * 20}
    ok = gate(cfg, holdout=rows, pairs=[], predictions=better, ask_judge=FakeJudge())
    assert ok.passed, ok.reasons
    cand = ok.scores["candidate"].overall
    assert cand["judge_win_rate"] == 1.0 and cand["judge_win_rate_low"] == pytest.approx(wilson_interval(20, 20)[0])
    assert ok.scores["champion"].overall["judge_win_rate"] == 0.0
    assert {c["slice"] for c in ok.slice_checks} == {"lang=en", "lang=fr"}
    assert ok.evaluators["judge"]["prompt_version"] == "pairwise-v1" and "20 wins" in ok.table()

    # wins on en, loses on fr: 0.5 overall, lower bound < 0.5, and the fr slice regresses against the champion
    mixed = [Prediction("good" if i < 10 else "meh") for i in range(20)]
    champ_fr = [Prediction("meh" if i < 10 else "good") for i in range(20)]
    bad = gate(cfg, holdout=rows, pairs=[], ask_judge=FakeJudge(),
               predictions={"base": champ_fr, "champion": champ_fr, "candidate": mixed})  # fmt: skip
    assert not bad.passed and "does not clear the threshold 0.5" in bad.reasons[0]
    assert [c["slice"] for c in bad.slice_checks if not c["ok"]] == ["lang=fr"]

    # a handful of wins is not enough evidence: the interval is wide
    few = gate(cfg, holdout=rows[:3], pairs=[], ask_judge=FakeJudge(),
               predictions={n: p[:3] for n, p in better.items()})  # fmt: skip
    assert few.scores["candidate"].overall["judge_win_rate"] == 1.0 and not few.passed


def test_judge_human_agreement_and_kappa() -> None:
    pairs = [HumanPair(f"q{i}", "good answer", "meh answer") for i in range(6)]
    agree = judge_human_agreement(pairs, FakeJudge(), prompt_version="pairwise-v1")
    assert (agree["pairs"], agree["judged"], agree["agreement"]) == (6, 6, 1.0)
    assert agree["kappa"] == pytest.approx(1.0)
    biased = judge_human_agreement(pairs, FakeJudge(fixed="A"), prompt_version="pairwise-v1")
    assert biased["agreement"] == 0.0 and biased["kappa"] == pytest.approx(0.0)  # agrees no more than chance
    contrary = judge_human_agreement([HumanPair("q", "meh", "good")], FakeJudge(), prompt_version="pairwise-v1")
    assert contrary["agreement"] == 0.0 and contrary["kappa"] == pytest.approx(-1.0)


def test_the_gate_reports_agreement_on_preference_rows_and_can_require_it() -> None:
    pair = {"prompt": "q", "messages": [{"role": "user", "content": "q"}], "chosen": "good one<|im_end|>",
            "rejected": "meh one<|im_end|>", "chosen_answer": "good one", "rejected_answer": "meh one"}  # fmt: skip
    preds = {n: [Prediction("good")] for n in ("base", "candidate")}
    cfg = EvalSection(evaluators=["judge"], primary_metric="judge_win_rate", judge={**JUDGE, "threshold": 0.0})
    res = gate(cfg, holdout=[], pairs=[pair], predictions=preds, ask_judge=FakeJudge())
    assert res.evaluators["judge"]["human_agreement"]["agreement"] == 1.0 and "agreement 1.000" in res.table()
    wrong = {**pair, "chosen_answer": "meh one", "rejected_answer": "good one"}
    need = cfg.model_copy(update={"judge": cfg.judge.model_copy(update={"min_human_agreement": 0.8})})
    res = gate(need, holdout=[], pairs=[wrong], predictions=preds, ask_judge=FakeJudge())
    assert not res.passed and "min_human_agreement 0.8" in res.reasons[0]


def test_human_pairs_from_n_choice_feedback() -> None:
    choices = [ChoiceLog(index=0, text="first"), ChoiceLog(index=1, text="second"),
               ChoiceLog(index=2, text="", tool_calls=[ToolCallLog(name="f", arguments='{"x": 1}')])]  # fmt: skip
    req = RequestEvent(request_id="r1", alias="a", endpoint="chat", messages=[{"role": "user", "content": "hi"}],
                       choices=choices, latency_ms=1, status=200, replica="x")  # fmt: skip
    fb = [
        FeedbackEvent(request_id="r1", choice_index=1, kind="thumbs", value=True),
        FeedbackEvent(request_id="r1", kind="score", value=1.0),  # choice 0, bad
        FeedbackEvent(request_id="r1", choice_index=2, kind="score", value=5.0),
        FeedbackEvent(request_id="r1", choice_index=2, kind="thumbs", value=False, source="automatic"),
    ]
    pairs = human_pairs_from_feedback([req], fb)
    assert [(p.preferred, p.other) for p in pairs] == [("second", "first"), ('f({"x": 1})', "first")]
    assert pairs[0].prompt == "user: hi"


# ------------------------------------------------------------------------------------ reference metrics


def test_chrf_and_rouge_l_match_their_libraries() -> None:
    import sacrebleu
    from rouge_score import rouge_scorer

    hyp, ref = "the cat sat on the mat", "a cat sat on a mat"
    assert chrf(hyp, ref) == pytest.approx(sacrebleu.sentence_chrf(hyp, [ref]).score / 100)
    assert rouge_l(hyp, ref) == pytest.approx(rouge_scorer.RougeScorer(["rougeL"]).score(ref, hyp)["rougeL"].fmeasure)
    assert chrf("", "") == 1.0 and rouge_l("x", "x") == 1.0 and chrf("abc", "xyz") == 0.0
    assert rouge_l("привет мир", "привет всем") == pytest.approx(0.5)  # not 0: Unicode words count


def test_preferred_loss_applies_to_pair_rows_only() -> None:
    rows = [{"answer": "a"}, {"chosen": "c", "rejected": "r"}, {"chosen": "c", "rejected": "r"}]
    assert preferred_loss_scores(rows, [None, (3.0, 2), (0.0, 0)]) == [None, -1.5, None]


# ------------------------------------------------------------------------------------------- tool calls

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"id": {"type": "string"}, "n": {"type": "integer"}}, "required": ["id"]}}},
    {"type": "function", "function": {"name": "cancel"}}]  # fmt: skip


def _calls(*calls: tuple[str, str]) -> Prediction:
    return Prediction("", tuple(ToolCall(n, a) for n, a in calls))


def test_tool_call_metrics() -> None:
    row = {"tools": TOOLS, "answer_tool_calls": [{"id": "c1", "name": "lookup", "arguments": '{"id": "A", "n": 2}'}]}
    exact = score_row(row, _calls(("lookup", '{ "n": 2,  "id": "A" }')))  # key order and spacing do not matter
    assert exact == {"tool_valid_rate": 1.0, "tool_name_accuracy": 1.0, "tool_exact_match": 1.0, "tool_field_f1": 1.0}
    half = score_row(row, _calls(("lookup", '{"id": "B", "n": 2}')))
    assert half["tool_exact_match"] == 0.0 and half["tool_field_f1"] == pytest.approx(0.5)
    assert half["tool_valid_rate"] == 1.0 and half["tool_name_accuracy"] == 1.0
    # not valid: an unknown tool, arguments that are not JSON, arguments against the schema
    bad = score_row(row, _calls(("delete", "{}"), ("lookup", "{id: A"), ("lookup", '{"n": "x"}'), ("cancel", "{}")))
    assert bad["tool_valid_rate"] == 0.25 and bad["tool_name_accuracy"] == 0.0
    nothing = score_row(row, Prediction("I looked it up"))
    assert nothing["tool_valid_rate"] is None and nothing["tool_exact_match"] == nothing["tool_field_f1"] == 0.0
    # a text answer was the right one: no call expected, none made
    text_row = {"tools": TOOLS, "completion_tool_calls": None}  # an exported (not yet formatted) row
    assert score_row(text_row, Prediction("sure"))["tool_exact_match"] == 1.0
    # explicit references win, in the OpenAI shape too; rows without tools are out of scope
    ref_row = {"reference_tool_calls": [{"type": "function", "function": {"name": "cancel", "arguments": {}}}]}
    assert score_row(ref_row, _calls(("cancel", "{}")))["tool_exact_match"] == 1.0
    assert set(score_row({"answer": "x"}, _calls(("cancel", "{}"))).values()) == {None}
    pair = {"tools": TOOLS, "chosen": "", "chosen_tool_calls": [{"name": "cancel", "arguments": "{}"}]}
    assert score_row(pair, _calls(("cancel", "{}")))["tool_name_accuracy"] == 1.0


def test_field_f1_counts_argument_pairs() -> None:
    ref = [ToolCall("f", '{"a": 1, "b": [1, 2], "c": {"x": 1}}')]
    pred = [ToolCall("f", '{"a": 1, "b": [1, 2], "c": {"x": 2}, "d": 0}')]
    assert field_f1(pred, ref) == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))
    assert field_f1([ToolCall("g", '{"a": 1}')], [ToolCall("f", '{"a": 1}')]) == 0.0  # fields count per tool
    assert field_f1([ToolCall("f", "{}")], [ToolCall("f", "")]) == 1.0


def test_schema_validity() -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "v", "schema": schema}}
    rows = [{"response_format": fmt}] * 3 + [{"response_format": {"type": "json_object"}}, {"answer": "x"},
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}}]  # fmt: skip
    preds = [Prediction(t) for t in ('{"ok": true}', '{"ok": "yes"}', '{"ok": tr', "[1]", "x", "{}")]
    assert score_schema(rows, preds)["schema_valid_rate"] == [1.0, 0.0, 0.0, 0.0, None, None]


# ------------------------------------------------------------------------------------------------ rubrics


def polite(row: dict[str, Any], answer: str) -> float:
    """An example rubric: polite answers score 1."""
    return 1.0 if "please" in answer.lower() else 0.0


def raising(row: dict[str, Any], answer: str) -> float:
    raise KeyError("missing field")


def wordy(row: dict[str, Any], answer: str) -> Any:
    return "yes"


def too_high(row: dict[str, Any], answer: str) -> float:
    return 1.5


def not_a_number(row: dict[str, Any], answer: str) -> float:
    return math.nan


NOT_CALLABLE = 3
HERE = __name__


def test_rubrics_load_from_paths_and_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rubric_mod.load_rubric(f"{HERE}:polite") is polite
    assert rubric_mod.load_rubric(f"{HERE}.polite") is polite
    ep = EntryPoint(name="polite", value=f"{HERE}:polite", group=rubric_mod.ENTRY_POINT_GROUP)
    monkeypatch.setattr(rubric_mod, "entry_points", lambda group, name: [ep] if name == "polite" else [])
    assert rubric_mod.load_rubric("polite") is polite
    ev = rubric_mod.rubric_evaluator("polite", name="manners")
    assert ev.metric == "rubric:manners"
    res = ev(EvalInput([{}, {}], {"candidate": [Prediction("Please wait"), Prediction("no")]}))
    assert res.per_row == {"candidate": {"rubric:manners": [1.0, 0.0]}} and not res.failures


@pytest.mark.parametrize(
    ("spec", "says"),
    [("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"), (f"{HERE}:missing", "has no attribute"),
     (f"{HERE}:NOT_CALLABLE", "int is not callable"), ("unknown_entry", "no entry point of that name")],
)  # fmt: skip
def test_a_rubric_that_does_not_load_fails_the_gate_before_generating(spec: str, says: str) -> None:
    with pytest.raises(rubric_mod.RubricError, match=says):
        rubric_mod.load_rubric(spec)
    cfg = EvalSection(evaluators=["exact_match", {"rubric": spec}])
    _, failures = build_evaluators(cfg)
    assert len(failures) == 1 and spec in failures[0] and says in failures[0]


@pytest.mark.parametrize(
    ("fn", "says"),
    [("raising", "raised KeyError"), ("wordy", "returned str 'yes'"), ("too_high", "returned 1.5"),
     ("not_a_number", "returned nan")],
)  # fmt: skip
def test_a_rubric_that_raises_or_returns_a_bad_score_fails_closed(fn: str, says: str) -> None:
    cfg = EvalSection(evaluators=["exact_match", {"rubric": f"{HERE}:{fn}"}])
    rows = [{"prompt": "q", "answer": "a"}]
    preds = {"base": [Prediction("x")], "candidate": [Prediction("a")]}
    result = gate(cfg, holdout=rows, pairs=[], predictions=preds)
    assert not result.passed and result.reasons[0].startswith(f"rubric:{fn} ({HERE}:{fn}) on row 0")
    assert says in result.reasons[0]
    assert rubric_mod.checked_score(True) == 1.0


# ----------------------------------------------------------------------------------------- gate and config


def test_every_evaluator_metric_is_gated_per_slice() -> None:
    rows = _slice_rows(20)
    for r in rows:
        r["tools"], r["reference_tool_calls"] = TOOLS, [{"name": "cancel", "arguments": "{}"}]
    cfg = EvalSection(evaluators=["exact_match", "chrf", "tool_calls", {"rubric": f"{HERE}:polite"}],
                      primary_metric="tool_exact_match", min_slice_samples=5)  # fmt: skip
    champion = [Prediction("ref", (ToolCall("cancel", "{}"),))] * 20
    # better on en (was wrong there before), worse on fr
    before = [Prediction("ref", (ToolCall("cancel", "{}"),) if i >= 10 and i < 15 else ()) for i in range(20)]
    after = [Prediction("please", (ToolCall("cancel", "{}"),) if i < 10 or i >= 18 else ()) for i in range(20)]
    result = gate(cfg, holdout=rows, pairs=[], predictions={"base": champion, "champion": before, "candidate": after})
    cand = result.scores["candidate"]
    assert cand.overall["tool_exact_match"] == 0.6 and result.scores["champion"].overall["tool_exact_match"] == 0.25
    assert cand.slices["lang=fr"]["tool_exact_match"] == 0.2 and cand.slices["lang=fr"]["n_tool_exact_match"] == 10
    assert cand.overall["rubric:polite"] == 1.0 and cand.overall["chrf"] < 0.2
    assert not result.passed and [c["slice"] for c in result.slice_checks if not c["ok"]] == ["lang=fr"]
    assert result.reasons[0].startswith("tool_exact_match 0.6000 vs champion's 0.2500")


def test_default_evaluators_keep_the_old_figures() -> None:
    from retrain.evaluate import score

    rows = [{"prompt": "q", "answer": a, "slices": {"k": a}} for a in ("yes", "no", "yes", "no")]
    preds = ["yes", "yes", "yes", "no"]
    pair = {"prompt": "p", "chosen": "yes<|im_end|>", "rejected": "no"}
    cfg = EvalSection()
    predictions = {"base": [Prediction("no")] * 5, "candidate": [*map(Prediction, preds), Prediction("yes")]}
    none: list[float | None] = [None] * 5
    losses = {"base": ({"neg_loss": -2.0}, none), "candidate": ({"neg_loss": -1.0}, none)}
    res = gate(cfg, holdout=rows, pairs=[pair], predictions=predictions, losses=losses)
    legacy = score("candidate", rows, preds, label_like=True, extra={"neg_loss": -1.0, "preferred_match_rate": 1.0})
    assert res.scores["candidate"].overall == legacy.overall and res.scores["candidate"].slices == legacy.slices
    assert res.passed and res.evaluators == {}


def test_recipe_evaluator_config(tmp_path: Any) -> None:
    assert list(EvaluatorName.__args__) == list(METRICS)  # type: ignore[attr-defined]
    assert EvalSection().evaluators == ["exact_match", "preferred_match", "loss"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {base: m}\neval:\n  evaluators: [judge, chrf, {rubric: 'pkg.mod:func'}]\n"
                      "  primary_metric: 'rubric:func'\n  judge: {url: 'http://j/v1', model: big}\n")  # fmt: skip
    assert load_recipe(recipe).eval.evaluator_names == ["judge", "chrf", "rubric:func"]
    for bad, says in [({"primary_metric": "chrf"}, "needs the evaluator 'chrf'"),
                      ({"evaluators": ["judge"], "primary_metric": "judge_win_rate"}, "eval.judge.url"),
                      ({"primary_metric": "loss"}, "not a metric the gate can gate on"),
                      ({"evaluators": ["exact_match", "tool_calls", "tool_calls"]}, "listed twice")]:  # fmt: skip
        recipe.write_text(json.dumps({"model": {"base": "m"}, "eval": bad}))
        with pytest.raises(RecipeError, match=says):
            load_recipe(recipe)


def test_rows_with_tools_generate_through_chat_and_keep_the_tool_calls() -> None:
    row = {"prompt": "<rendered>", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
           "tool_choice": "auto", "response_format": None}  # fmt: skip
    endpoint, body = request_for(row, "m", 32)
    assert endpoint == "/v1/chat/completions" and body["tools"] == TOOLS and body["tool_choice"] == "auto"
    assert body["messages"] == row["messages"] and "response_format" not in body and body["temperature"] == 0.0
    assert request_for({"prompt": "<rendered>", "messages": row["messages"]}, "m", 8)[0] == "/v1/completions"
    reply = {"choices": [{"message": {"content": None, "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": "lookup", "arguments": '{"id": "A"}'}}]}}]}  # fmt: skip
    assert prediction_from(endpoint, reply) == Prediction("", (ToolCall("lookup", '{"id": "A"}'),))
    assert prediction_from("/v1/completions", {"choices": [{"text": " yes<|im_end|>junk"}]}) == Prediction("yes")
