"""The back-end pool's health policy: a definite "not healthy" (an answer other than 200, a refused
connection) takes a back-end out at once; timed-out checks only after `unhealthy_after` in a row, so
a vLLM server that is slow to accept during a burst keeps serving."""

from __future__ import annotations

import httpx
import pytest

from serving.backends import BackendPool
from serving.errors import OpenAIError
from serving.metrics import GatewayMetrics

URL = "http://vllm:8000"


def make_pool(outcomes: list[str]) -> BackendPool:
    """A pool whose one back-end's /health answers with the next of `outcomes` per check:
    "ok" (200), "503", "timeout" or "refused"."""

    def handler(request: httpx.Request) -> httpx.Response:
        outcome = outcomes.pop(0)
        if outcome == "timeout":
            raise httpx.ConnectTimeout("timed out", request=request)
        if outcome == "refused":
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return httpx.Response(200 if outcome == "ok" else int(outcome))

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return BackendPool([URL], client, GatewayMetrics(), unhealthy_after=3)


def up_metric(pool: BackendPool) -> float:
    return pool.metrics.backend_up.labels(URL)._value.get()


async def test_timeouts_take_a_backend_out_only_after_enough_in_a_row() -> None:
    pool = make_pool(["ok", "timeout", "timeout", "ok", "timeout", "timeout", "timeout"])
    backend = pool.backends[0]
    assert await pool.check(backend) and backend.healthy
    for _ in range(2):  # two misses: still serving
        assert await pool.check(backend)
        assert backend.healthy and pool.pick() is backend and up_metric(pool) == 1
    assert backend.state()["missed_checks"] == 2  # shown to operators in GET /health
    assert await pool.check(backend) and backend.missed_checks == 0  # an answer resets the count
    assert await pool.check(backend) and await pool.check(backend)
    assert not await pool.check(backend)  # the third in a row
    assert not backend.healthy and up_metric(pool) == 0
    assert "ConnectTimeout" in (backend.last_error or "") and "3 health checks in a row" in (backend.last_error or "")
    with pytest.raises(OpenAIError) as err:
        pool.pick()
    assert err.value.status == 503
    await pool.client.aclose()


@pytest.mark.parametrize("failure", ["503", "refused"])
async def test_a_definite_failure_takes_a_backend_out_at_once(failure: str) -> None:
    pool = make_pool(["ok", failure, "ok"])
    backend = pool.backends[0]
    assert await pool.check(backend)
    assert not await pool.check(backend)
    assert not backend.healthy and up_metric(pool) == 0
    assert await pool.check(backend) and backend.healthy  # back in rotation once it answers
    await pool.client.aclose()


async def test_a_backend_not_yet_in_rotation_stays_out_on_a_timeout() -> None:
    pool = make_pool(["timeout", "ok"])
    backend = pool.backends[0]
    assert not await pool.check(backend) and not backend.healthy
    assert await pool.check(backend) and backend.healthy
    await pool.client.aclose()
