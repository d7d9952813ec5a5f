"""Error mapping against the real vLLM (docs/serving.md, "Requests" and "Error mapping"):

* vLLM validates some requests only once a stream has started — it answers 200 and sends the error as the
  first event. The gateway looks at that event, so the client gets a real HTTP 400 with vLLM's message.
  Requests that do this on vLLM 0.32: a `logit_bias` or `allowed_token_ids` naming a token outside the
  vocabulary (checked by SamplingParams.verify inside the engine's generate()), a token prompt with an
  out-of-vocabulary id (checked by the engine's input processor).
* A back-end that does not answer within `backends.request_timeout_s` is a 504 `backend_timeout`: vLLM's
  engine is paused (SIGSTOP) so the API server takes the request but no token comes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveGateway
from tests.live_helpers import engine_paused, metric_value, remote_gateway, vllm_url

pytestmark = pytest.mark.integration

OUT_OF_VOCAB = 999_999  # the tiny model has 2,048 tokens
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_vllm_answers_these_with_an_error_event_under_200(live_gateway: LiveGateway) -> None:
    """The premise: straight to vLLM, a streamed request with an out-of-vocabulary logit_bias is a 200 whose
    first event is the error. If vLLM ever refuses it up front, the next test no longer covers the first-event
    path and needs another such request."""
    body = {**CHAT, "model": "base", "stream": True, "logit_bias": {str(OUT_OF_VOCAB): 5}}
    with httpx.Client(base_url=vllm_url(live_gateway), timeout=60) as c:
        resp = c.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200
    first = resp.text.split("\n\n")[0]
    assert first.startswith("data: {") and json.loads(first[6:])["error"]["code"] == 400, resp.text[:300]


@pytest.mark.parametrize(
    ("endpoint", "body", "param", "words"),
    [
        ("chat/completions", {**CHAT, "logit_bias": {str(OUT_OF_VOCAB): 5}}, "logit_bias", "out-of-vocab"),
        ("chat/completions", {**CHAT, "allowed_token_ids": [OUT_OF_VOCAB]}, "allowed_token_ids", "out-of-vocab"),
        ("completions", {"model": "tiny", "prompt": [OUT_OF_VOCAB], "max_tokens": 4}, None, "out of vocabulary"),
    ],
    ids=["chat-logit-bias", "chat-allowed-token-ids", "completions-token-prompt"],
)
def test_error_in_first_stream_event_is_an_http_400(
    live_gateway: LiveGateway, endpoint: str, body: dict, param: str | None, words: str
) -> None:
    kind = "chat" if endpoint.startswith("chat") else "completions"
    with live_gateway.client() as c:
        before = metric_value(c.get("/metrics").text, "loraloop_requests_total", alias="tiny", endpoint=kind,
                              status="400") or 0.0  # fmt: skip
        resp = c.post(f"/v1/{endpoint}", json={**body, "stream": True})
        assert resp.status_code == 400, resp.text[:500]
        assert resp.headers["content-type"].startswith("application/json")  # not an event stream
        err = resp.json()["error"]
        assert words in err["message"] and err["type"] == "invalid_request_error", err
        assert err["param"] == param
        assert resp.headers["x-request-id"] and resp.headers["x-loraloop-adapter"] == "base"
        # the same request without streaming is refused by vLLM up front: the same answer either way
        plain = c.post(f"/v1/{endpoint}", json=body)
        assert plain.status_code == 400 and words in plain.json()["error"]["message"], plain.text[:300]
        after = metric_value(c.get("/metrics").text, "loraloop_requests_total", alias="tiny", endpoint=kind,
                             status="400")  # fmt: skip
        assert after == before + 2  # logged as the 400s they are, not as served streams
        # without the bad field the same stream is served
        good = {k: v for k, v in body.items() if k != param}
        if kind == "completions":
            good["prompt"] = [1, 2, 3]
        ok = c.post(f"/v1/{endpoint}", json={**good, "stream": True})
        assert ok.status_code == 200 and ok.text.rstrip().endswith("data: [DONE]"), ok.text[-300:]


def test_backend_timeout_is_504(live_gateway: LiveGateway, tmp_path: Path) -> None:
    """`backends.request_timeout_s` runs out while vLLM's engine is stalled: 504 `backend_timeout`, for a plain
    request (no response head comes) and for a stream (the head comes, the first event does not)."""
    with remote_gateway(live_gateway, tmp_path, backends={"request_timeout_s": 1.0}) as gw, gw.client() as c:
        warm = c.post("/v1/chat/completions", json=CHAT)  # connection and pool set up before the stall
        assert warm.status_code == 200, warm.text
        answers = {}
        with engine_paused(live_gateway):
            for stream in (False, True):
                started = time.monotonic()
                resp = c.post("/v1/chat/completions", json={**CHAT, "stream": stream})
                answers[stream] = (resp.status_code, resp.json(), time.monotonic() - started)
        for stream, (status, body, took) in answers.items():
            assert status == 504, (stream, body)
            assert body["error"]["code"] == "backend_timeout" and body["error"]["type"] == "timeout_error", body
            assert 0.9 < took < 30, (stream, took)
        metrics = c.get("/metrics").text
        assert metric_value(metrics, "loraloop_requests_total", alias="tiny", endpoint="chat", status="504") == 2
        # once the engine runs again the same gateway serves, both ways
        for stream in (False, True):
            again = c.post("/v1/chat/completions", json={**CHAT, "stream": stream})
            assert again.status_code == 200, (stream, again.text[:300])
