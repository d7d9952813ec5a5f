"""The gateway in front of a real vLLM CPU server (tiny model), used through the official `openai`
client with strict response validation."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from serving.app import build_app
from tests.conftest import API_KEY, LiveGateway, live_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(live_gateway: LiveGateway) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{live_gateway.url}/v1", api_key=API_KEY, max_retries=0, _strict_response_validation=True
    )


MSG = [{"role": "user", "content": "Is this review positive or negative? Great product."}]


def test_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids[:2] == ["tiny", "tiny-greedy"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_chat(client: openai.OpenAI) -> None:
    resp = client.chat.completions.with_raw_response.create(model="tiny", messages=MSG, max_tokens=8, seed=1)
    chat = resp.parse()
    assert chat.model == "tiny" and chat.id == resp.headers["x-request-id"]
    assert resp.headers["x-loraloop-adapter"] == "base"
    assert chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.completion_tokens > 0


def test_completions(client: openai.OpenAI) -> None:
    out = client.completions.create(model="tiny", prompt="The product is", max_tokens=6, temperature=0)
    assert out.model == "tiny" and out.id.startswith("cmpl-") and out.choices[0].text
    assert out.usage is not None and out.usage.completion_tokens == 6


def test_seed_and_greedy_are_deterministic(client: openai.OpenAI) -> None:
    a = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=10, seed=123, temperature=1.0)
    b = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=10, seed=123, temperature=1.0)
    assert a.choices[0].message.content == b.choices[0].message.content
    g = client.chat.completions.create(model="tiny-greedy", messages=MSG)  # alias defaults: greedy, 8 tokens
    assert g.usage is not None and g.usage.completion_tokens <= 8


def test_n_and_stop(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="tiny", messages=MSG, n=2, max_tokens=5, temperature=1.0, seed=3)
    assert sorted(c.index for c in out.choices) == [0, 1]
    # Greedy with ignore_eos: twelve tokens whatever the tiny model's weights, the same on every call. The
    # stop string is a token from the middle of that output, so the stopped answer is known exactly: the
    # text before the stop string's first occurrence, cut there, with finish_reason "stop".
    greedy = {
        "model": "tiny",
        "prompt": "a b c",
        "max_tokens": 12,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    base = client.completions.create(**greedy, logprobs=0).choices[0]
    assert base.finish_reason == "length" and base.logprobs is not None and base.logprobs.tokens
    tokens, text = base.logprobs.tokens, base.text
    assert len(tokens) == 12 and "".join(tokens) == text
    stop_word = next(t for t in tokens[len(tokens) // 2 :] if t.strip())  # visible text, not whitespace alone
    expected = text[: text.index(stop_word)]
    assert expected.strip(), (text, stop_word)  # the stop comes after some output: a cut, not an empty answer
    stopped = client.completions.create(**greedy, stop=[stop_word]).choices[0]
    assert (stopped.text, stopped.finish_reason) == (expected, "stop"), (text, stop_word)


def test_logprobs(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, logprobs=True, top_logprobs=2)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.content and len(lp.content[0].top_logprobs) == 2
    comp = client.completions.create(model="tiny", prompt="hello", max_tokens=3, logprobs=2)
    assert comp.choices[0].logprobs is not None and comp.choices[0].logprobs.tokens


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")
    assert {c.model for c in chunks} == {"tiny"}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # Legacy completion chunks carry finish_reason null until the last one (as OpenAI's and vLLM's do),
    # which the SDK's strict model refuses; schemathesis checks these chunks against the spec instead.
    lenient = client.with_options()
    lenient._strict_response_validation = False
    comp = list(lenient.completions.create(model="tiny", prompt="x", max_tokens=4, stream=True,
                                           extra_body={"ignore_eos": True}))  # fmt: skip  # sampled: EOS may come first
    assert {c.id for c in comp} == {comp[0].id} and comp[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in comp)  # not asked for: the gateway drops the usage chunk


def test_stream_is_not_buffered(live_gateway: LiveGateway) -> None:
    """Chunks arrive as vLLM makes them: the first one long before the last one."""
    body = {"model": "tiny", "prompt": "one two", "max_tokens": 400, "stream": True, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    arrivals: list[float] = []
    with live_gateway.client() as c, c.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        start = time.perf_counter()
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.perf_counter() - start)
    assert len(arrivals) >= 100
    assert arrivals[0] < 0.5 * arrivals[-1], (arrivals[0], arrivals[-1])


def _counter(text: str, name: str, *labels: str) -> float:
    """The sum of a counter's samples whose labels include all of `labels` (`key="value"`)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(label in line for label in labels)
    )


def test_client_disconnect_aborts_the_vllm_request(live_gateway: LiveGateway) -> None:
    """A client that leaves mid-stream: the gateway cuts the upstream stream, vLLM aborts the request
    (it stops generating: far fewer than the 1000 tokens asked for), and the gateway logs a 499."""
    managed = live_gateway.settings.backends.managed
    vllm = f"http://{managed.host}:{managed.port}/metrics"
    gone = ("loraloop_requests_total", 'alias="tiny"', 'endpoint="completions"', 'status="499"')
    tokens_before = _counter(httpx.get(vllm).text, "vllm:generation_tokens_total")
    gone_before = _counter(httpx.get(f"{live_gateway.url}/metrics").text, *gone)
    body = {"model": "tiny", "prompt": "one two", "max_tokens": 1000, "stream": True, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    with live_gateway.client(API_KEY) as c, c.stream("POST", "/v1/completions", json=body) as resp:
        lines = resp.iter_lines()
        assert sum(1 for _, line in zip(range(6), lines, strict=False) if line.startswith("data: {")) >= 2
    # the connection is closed here, about 1000 tokens before the end of the stream
    deadline = time.monotonic() + 30
    while _counter(httpx.get(f"{live_gateway.url}/metrics").text, *gone) <= gone_before:
        assert time.monotonic() < deadline, "the gateway did not log the request as 499"
        time.sleep(0.05)
    while _counter(httpx.get(vllm).text, "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "vLLM kept running the request of a client that left"
        time.sleep(0.05)
    generated = _counter(httpx.get(vllm).text, "vllm:generation_tokens_total") - tokens_before
    assert generated < 500, f"vLLM generated {generated} of 1000 tokens for a client that left after 2"


def test_error_mapping(client: openai.OpenAI, live_gateway: LiveGateway) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=MSG, temperature=5)
    assert bad.value.status_code == 400 and "temperature" in str(bad.value)
    with pytest.raises(openai.BadRequestError):  # refused by vLLM itself: longer than the context
        client.completions.create(model="tiny", prompt="x", max_tokens=100_000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-alias", messages=MSG)
    wrong = openai.OpenAI(base_url=f"{live_gateway.url}/v1", api_key="sk-wrong-key-000", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


async def test_dead_backend_is_503(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = live_settings(tiny_model_dir, tmp_path, backends={"mode": "remote", "urls": ["http://127.0.0.1:9"]})
    app = build_app(settings)
    await app.state.pool.check_all()
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw/v1")
    client = openai.AsyncOpenAI(base_url="http://gw/v1", api_key=API_KEY, http_client=http, max_retries=0,
                                _strict_response_validation=True)  # fmt: skip
    with pytest.raises(openai.InternalServerError) as exc:
        await client.chat.completions.create(model="tiny", messages=MSG)  # type: ignore[arg-type]
    assert exc.value.status_code == 503 and "no healthy vLLM back-end" in str(exc.value)
    await http.aclose()
    await app.state.pool.client.aclose()


def test_metrics_pass_promtool(live_gateway: LiveGateway, tmp_path: Path) -> None:
    with live_gateway.client(key=None) as c:
        text = c.get("/metrics").text
    assert 'loraloop_requests_total{adapter="base",alias="tiny",endpoint="chat",status="200"}' in text
    assert 'loraloop_backend_up{backend="' in text
    promtool = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert promtool.returncode == 0, promtool.stdout + promtool.stderr
