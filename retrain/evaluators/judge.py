"""Pairwise judge: candidate vs reference (the champion; the base when there is none) on held-out prompts,
asked of any OpenAI-compatible chat endpoint (``eval.judge``: a strong hosted model in production).

* The prompt is versioned (``JUDGE_PROMPTS``; the recipe's ``judge.prompt_version``); the gate result
  stores the version and the SHA-256 of its text, so figures from different prompts are never compared.
* Both orders are asked for every prompt (candidate as A, then as B) against position bias.
* The verdict is parsed strictly: the reply, stripped of surrounding whitespace, must be exactly ``A``,
  ``B`` or ``TIE``; anything else is unparseable. An endpoint error is unusable too.
* The two orders combine into one outcome per prompt: a *win* when both favour the candidate, a *loss* when
  both favour the reference, a *tie* otherwise (TIE replies, or the orders disagree: position bias). A
  prompt with an unusable verdict in either order is left out.
* ``judge_win_rate`` = (wins + ties / 2) / n, with a Wilson score interval (statsmodels'
  ``proportion_confint(method="wilson")``) at ``judge.confidence``; the gate passes on the judge when the
  interval's lower bound exceeds ``judge.threshold``. Per row the candidate scores 1 / 0.5 / 0 and the
  reference the complement, so per-slice gating works as for every metric.
* Fail closed: when more than ``judge.max_invalid_fraction`` of the verdicts are unusable (the endpoint is
  down, times out, or answers garbage), or none is usable, the gate fails with the reason.

Judge–human agreement: preference pairs (a human preferred one of two answers to the same prompt: the
holdout's chosen / rejected rows, or two choices of one ``n`` > 1 response rated apart,
``human_pairs_from_feedback``) are judged the same way; the agreement rate is the fraction of pairs where the
judge prefers the human's choice in both orders, and Cohen's kappa (statsmodels) compares the judge's
per-order verdicts (A / B / TIE) with the human's (the position the preferred answer was shown in).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import httpx

from core.errors import LoraloopError
from retrain.evaluators.base import EvalInput, EvaluatorResult, Prediction, ToolCall, normalize

if TYPE_CHECKING:
    from feedback.events import FeedbackEvent, RequestEvent
    from retrain.recipe import JudgeSection

Verdict = Literal["A", "B", "TIE"]
VERDICTS: tuple[Verdict, ...] = ("A", "B", "TIE")

_SYSTEM_V1 = (
    "You are an impartial judge of AI assistant answers. You are shown a conversation and two answers to its "
    "last turn, Answer A and Answer B. Decide which answer is better: more correct, more helpful, more faithful "
    "to the request, and better at following any format it asks for. Ignore the order in which the answers are "
    "shown and their length unless length matters to the request. Reply with exactly one of A, B or TIE "
    "(TIE when they are equally good or equally bad), and nothing else."
)
_USER_V1 = (
    "[Conversation]\n{question}\n\n[Answer A]\n{answer_a}\n\n[Answer B]\n{answer_b}\n\n"
    "Which answer is better? Reply with exactly one of: A, B, TIE."
)
#: Versioned judge prompts: (system, user template). Add a version rather than change one.
JUDGE_PROMPTS: dict[str, tuple[str, str]] = {"pairwise-v1": (_SYSTEM_V1, _USER_V1)}


def prompt_sha256(version: str) -> str:
    """The SHA-256 of a prompt version's text (stored beside the version in the gate result)."""
    system, user = JUDGE_PROMPTS[version]
    return hashlib.sha256(f"{system}\x00{user}".encode()).hexdigest()


def judge_messages(version: str, question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    """The chat messages asking the judge about one ordered pair of answers."""
    system, user = JUDGE_PROMPTS[version]
    content = user.format(question=question, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def parse_verdict(reply: str | None) -> Verdict | None:
    """``A``, ``B`` or ``TIE`` when the reply is exactly that after stripping whitespace; else None."""
    text = (reply or "").strip()
    return next((v for v in VERDICTS if text == v), None)


def combine(candidate_first: Verdict | None, candidate_second: Verdict | None) -> float | None:
    """One prompt's outcome for the candidate from the two orders (candidate shown as A, then as B):
    1 = win (both favour it), 0 = loss (both favour the other), 0.5 = tie; None when either is unusable."""
    if candidate_first is None or candidate_second is None:
        return None
    first = {"A": 1.0, "B": 0.0, "TIE": 0.5}[candidate_first]
    second = {"B": 1.0, "A": 0.0, "TIE": 0.5}[candidate_second]
    if first == second == 1.0:
        return 1.0
    if first == second == 0.0:
        return 0.0
    return 0.5


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (statsmodels; ``successes`` may count ties as halves)."""
    from statsmodels.stats.proportion import proportion_confint

    if n <= 0:
        return 0.0, 1.0
    low, high = proportion_confint(successes, n, alpha=1.0 - confidence, method="wilson")
    return float(low), float(high)


def answer_text(pred: Prediction) -> str:
    """An answer as the judge sees it: its text, then one ``name(arguments)`` line per tool call."""
    lines = [normalize(pred.text), *(f"{c.name}({c.arguments})" for c in pred.tool_calls)]
    return "\n".join(line for line in lines if line) or "(empty answer)"


# --------------------------------------------------------------------------------------------- asking


@dataclass(frozen=True)
class JudgeReply:
    """The judge's reply text, or why there is none."""

    text: str | None
    error: str | None = None


#: Asks the judge every conversation of a batch; one reply per conversation, in order.
AskJudge = Callable[[Sequence[list[dict[str, str]]]], list[JudgeReply]]


def openai_judge(url: str, model: str, *, api_key: str | None, max_tokens: int, concurrency: int,
                 timeout_s: float, transport: httpx.AsyncBaseTransport | None = None) -> AskJudge:  # fmt: skip
    """An ``AskJudge`` on an OpenAI-compatible endpoint: ``POST {url}/chat/completions`` (``url`` ends in
    ``/v1`` as in OpenAI's clients), temperature 0, concurrent requests. ``transport``: httpx's (tests)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def ask_all(batch: Sequence[list[dict[str, str]]]) -> list[JudgeReply]:
        sem = asyncio.Semaphore(concurrency)
        client = httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout_s, headers=headers, transport=transport)
        async with client:

            async def one(messages: list[dict[str, str]]) -> JudgeReply:
                body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
                async with sem:
                    try:
                        r = await client.post("/chat/completions", json=body)
                    except httpx.HTTPError as exc:
                        return JudgeReply(None, f"{type(exc).__name__}: {exc}"[:300])
                if r.status_code >= 400:
                    return JudgeReply(None, f"HTTP {r.status_code}: {r.text[:200]}")
                try:
                    return JudgeReply(str(r.json()["choices"][0]["message"]["content"] or ""))
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    return JudgeReply(None, f"not a chat completion ({type(exc).__name__}): {r.text[:200]}")

            return list(await asyncio.gather(*(one(m) for m in batch)))

    return lambda batch: asyncio.run(ask_all(list(batch)))


@dataclass
class Tally:
    """What came back for a batch of ordered asks."""

    asked: int = 0
    errors: int = 0
    unparseable: int = 0
    examples: list[str] = field(default_factory=list)  # the first few distinct problems, for the reason line

    def note(self, reply: JudgeReply) -> Verdict | None:
        self.asked += 1
        verdict = parse_verdict(reply.text) if reply.error is None else None
        if verdict is None:
            if reply.error is not None:
                self.errors += 1
            else:
                self.unparseable += 1
            example = reply.error if reply.error is not None else f"reply {reply.text!r}"[:120]
            if len(self.examples) < 3 and example not in self.examples:
                self.examples.append(example)
        return verdict

    @property
    def unusable(self) -> int:
        return self.errors + self.unparseable


def ask_both_orders(ask: AskJudge, version: str, items: Sequence[tuple[str, str, str]],
                    tally: Tally) -> list[tuple[Verdict | None, Verdict | None]]:  # fmt: skip
    """Verdicts for (question, x, y) items asked as (A=x, B=y) and as (A=y, B=x)."""
    batch = []
    for question, x, y in items:
        batch += [judge_messages(version, question, x, y), judge_messages(version, question, y, x)]
    replies = ask(batch)
    if len(replies) != len(batch):
        raise RuntimeError(f"the judge answered {len(replies)} of {len(batch)} questions")
    verdicts = [tally.note(r) for r in replies]
    return [(verdicts[2 * i], verdicts[2 * i + 1]) for i in range(len(items))]


# ------------------------------------------------------------------------------------- human agreement


@dataclass(frozen=True)
class HumanPair:
    """Two answers to one prompt, one of which a human preferred."""

    prompt: str
    preferred: str
    other: str


def _calls_of(value: Any) -> tuple[ToolCall, ...]:
    from retrain.evaluators.toolcalls import _call_of

    calls = (_call_of(c) for c in value or ()) if isinstance(value, list) else ()
    return tuple(c for c in calls if c is not None)


def human_pairs_from_rows(rows: Iterable[dict[str, Any]]) -> list[HumanPair]:
    """The holdout's preference rows (``chosen`` / ``rejected``, tool calls included) as human pairs."""
    from retrain.data.sources import prompt_text

    out = []
    for row in rows:
        if "chosen" not in row or "rejected" not in row:
            continue
        answers = [
            answer_text(Prediction(str(row.get(f"{f}_answer", row[f])), _calls_of(row.get(f"{f}_tool_calls"))))
            for f in ("chosen", "rejected")
        ]  # fmt: skip
        out.append(HumanPair(prompt_text(row), answers[0], answers[1]))
    return out


def _rating(event: FeedbackEvent, good_score: float, bad_score: float) -> bool | None:
    if event.kind == "thumbs" and isinstance(event.value, bool):
        return event.value
    if event.kind == "score" and isinstance(event.value, float):
        return True if event.value >= good_score else False if event.value <= bad_score else None
    return None


def human_pairs_from_feedback(requests: Iterable[RequestEvent], feedback: Iterable[FeedbackEvent], *,
                              good_score: float = 4.0, bad_score: float = 2.0) -> list[HumanPair]:  # fmt: skip
    """Pairs from ``n`` > 1 responses whose choices a human rated apart (``choice_index``): every choice rated
    good (thumbs up, score >= good_score) against every choice of the same response rated bad; the latest
    rating of a choice counts. Automatic feedback is not a human's."""
    from retrain.data.sources import prompt_text

    latest: dict[tuple[str, int], FeedbackEvent] = {}
    for ev in sorted(feedback, key=lambda e: e.ts):
        if ev.source != "automatic":
            latest[(ev.request_id, ev.choice_index or 0)] = ev
    out = []
    for req in requests:
        choices = {c.index: c for c in req.choices or ()}
        rated = {i: _rating(latest[(req.request_id, i)], good_score, bad_score)
                 for i in choices if (req.request_id, i) in latest}  # fmt: skip
        prompt = prompt_text({"messages": req.messages, "prompt": req.prompt, "tools": req.tools})
        text = {i: answer_text(Prediction(c.text or "", tuple(ToolCall(t.name, t.arguments) for t in c.tool_calls)))
                for i, c in choices.items()}  # fmt: skip
        out += [HumanPair(prompt, text[g], text[b]) for g, ok in sorted(rated.items()) if ok
                for b, bad in sorted(rated.items()) if bad is False]  # fmt: skip
    return out


def cohens_kappa(human: Sequence[Verdict], judge: Sequence[Verdict]) -> float | None:
    """Cohen's kappa of two raters' labels over A / B / TIE (statsmodels); None without labels."""
    import numpy as np
    from statsmodels.stats.inter_rater import cohens_kappa as sm_kappa

    if not human:
        return None
    table = np.zeros((3, 3))
    for h, j in zip(human, judge, strict=True):
        table[VERDICTS.index(h), VERDICTS.index(j)] += 1
    with np.errstate(divide="ignore", invalid="ignore"):  # its z statistic divides by 0 when one rater is constant
        kappa = float(sm_kappa(table).kappa)
    return None if math.isnan(kappa) else kappa  # undefined when both raters used one label: JSON has no NaN


def judge_human_agreement(pairs: Sequence[HumanPair], ask: AskJudge, *, prompt_version: str) -> dict[str, Any]:
    """How often the judge prefers what the human preferred (see the module docs): pairs, judged (usable in
    both orders), agreement rate, Cohen's kappa over the per-order verdicts, unusable verdicts."""
    tally = Tally()
    verdicts = ask_both_orders(ask, prompt_version, [(p.prompt, p.preferred, p.other) for p in pairs], tally)
    outcomes = [combine(a, b) for a, b in verdicts]
    judged = [o for o in outcomes if o is not None]
    human: list[Verdict] = []
    judge: list[Verdict] = []
    for first, second in verdicts:  # the human's label is where the preferred answer was shown: A, then B
        for label, got in (("A", first), ("B", second)):
            if got is not None:
                human.append(label)  # type: ignore[arg-type]
                judge.append(got)
    return {
        "pairs": len(pairs), "judged": len(judged),
        "agreement": sum(o == 1.0 for o in judged) / len(judged) if judged else None,
        "kappa": cohens_kappa(human, judge), "unusable": tally.unusable, "examples": tally.examples,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ the evaluator


class JudgeEvaluator:
    """``judge``: candidate vs reference on every row, and judge–human agreement on the preference rows."""

    name = "judge"

    def __init__(self, cfg: JudgeSection, ask: AskJudge | None = None) -> None:
        self.cfg, self._ask = cfg, ask

    def _asker(self) -> AskJudge:
        if self._ask is not None:
            return self._ask
        cfg = self.cfg
        key = None
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise JudgeUnavailable(f"the environment variable {cfg.api_key_env} (eval.judge.api_key_env) is unset")
        return openai_judge(str(cfg.url), str(cfg.model), api_key=key, max_tokens=cfg.max_tokens,
                            concurrency=cfg.concurrency, timeout_s=cfg.timeout_s)  # fmt: skip

    def __call__(self, data: EvalInput) -> EvaluatorResult:
        from retrain.data.sources import prompt_text

        cfg, version = self.cfg, self.cfg.prompt_version
        details: dict[str, Any] = {
            "prompt_version": version, "prompt_sha256": prompt_sha256(version), "model": cfg.model,
            "threshold": cfg.threshold, "confidence": cfg.confidence,
        }  # fmt: skip
        result = EvaluatorResult(details=details)
        cand, ref = data.predictions[data.candidate], data.predictions[data.reference]
        items = [(prompt_text(r), answer_text(c), answer_text(f)) for r, c, f in zip(data.rows, cand, ref, strict=True)]
        tally = Tally()
        try:
            ask = self._asker()
            outcomes = [combine(a, b) for a, b in ask_both_orders(ask, version, items, tally)]
        except Exception as exc:  # a judge that cannot be asked at all (no key, a malformed URL): fail closed
            result.failures.append(f"judge: cannot judge: {type(exc).__name__}: {exc}")
            return result
        details.update(self._summary(outcomes, tally))
        result.failures += self._unusable(tally, details["n"])
        complement = [None if o is None else 1.0 - o for o in outcomes]
        result.per_row = {data.candidate: {"judge_win_rate": outcomes}, data.reference: {"judge_win_rate": complement}}
        low, high = details["win_rate_low"], details["win_rate_high"]
        result.overall = {
            data.candidate: {"judge_win_rate_low": low, "judge_win_rate_high": high},
            data.reference: {"judge_win_rate_low": 1.0 - high, "judge_win_rate_high": 1.0 - low},
        }
        pairs = human_pairs_from_rows(data.rows)
        if pairs:
            details["human_agreement"] = judge_human_agreement(pairs, ask, prompt_version=version)
        result.failures += self._agreement_check(details.get("human_agreement"))
        return result

    def _summary(self, outcomes: Sequence[float | None], tally: Tally) -> dict[str, Any]:
        usable = [o for o in outcomes if o is not None]
        wins, ties = sum(o == 1.0 for o in usable), sum(o == 0.5 for o in usable)
        low, high = wilson_interval(wins + ties / 2, len(usable), self.cfg.confidence)
        return {
            "asked": tally.asked, "errors": tally.errors, "unparseable": tally.unparseable, "n": len(usable),
            "wins": wins, "ties": ties, "losses": len(usable) - wins - ties,
            "win_rate": (wins + ties / 2) / len(usable) if usable else None, "win_rate_low": low,
            "win_rate_high": high, "examples": tally.examples,
        }  # fmt: skip

    def _unusable(self, tally: Tally, judged: int) -> list[str]:
        if not tally.asked:
            return []
        share = tally.unusable / tally.asked
        if share <= self.cfg.max_invalid_fraction and judged:
            return []
        return [f"judge: {tally.unusable} of {tally.asked} verdicts unusable ({tally.errors} endpoint errors, "
                f"{tally.unparseable} replies not exactly A, B or TIE; e.g. {'; '.join(tally.examples)}), more than "
                f"max_invalid_fraction {self.cfg.max_invalid_fraction}: the gate cannot judge"]  # fmt: skip

    def _agreement_check(self, agreement: dict[str, Any] | None) -> list[str]:
        need = self.cfg.min_human_agreement
        if need is None:
            return []
        if not agreement or agreement["agreement"] is None:
            return [f"judge: min_human_agreement {need} is set but no preference pair got a usable verdict"]
        if agreement["agreement"] < need:
            return [f"judge: agrees with the human preference on {agreement['agreement']:.3f} of "
                    f"{agreement['judged']} pairs < min_human_agreement {need}"]  # fmt: skip
        return []


class JudgeUnavailable(LoraloopError):
    """The judge cannot be asked at all (its API key is missing)."""


__all__ = [
    "JUDGE_PROMPTS", "VERDICTS", "AskJudge", "HumanPair", "JudgeEvaluator", "JudgeReply", "JudgeUnavailable",
    "Tally", "answer_text", "ask_both_orders", "cohens_kappa", "combine", "human_pairs_from_feedback",
    "human_pairs_from_rows", "judge_human_agreement", "judge_messages", "openai_judge", "parse_verdict",
    "prompt_sha256", "wilson_interval",
]  # fmt: skip
