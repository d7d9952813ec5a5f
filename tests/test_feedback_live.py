"""Request → assignment → feedback → report, end to end through the live gateway and vLLM, on a real
event store (WAL + Parquet segments read with DuckDB)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.cli import main as cli
from feedback.reader import StoreReader
from feedback.report import build_report
from tests.conftest import ADMIN_KEY, LiveGateway

pytestmark = pytest.mark.integration


def chat(live: LiveGateway, alias: str, user: str | None, content: str = "Is this review positive?") -> tuple:
    with live.client() as c:
        resp = c.post("/v1/chat/completions", json={"model": alias, "user": user,
                                                    "messages": [{"role": "user", "content": content}]})  # fmt: skip
    assert resp.status_code == 200, resp.text
    return resp, resp.json()["choices"][0]["message"]["content"]


def test_experiment_routes_users_and_report_counts_feedback(live_gateway: LiveGateway, tmp_path: Path) -> None:
    root = live_gateway.settings.store.root
    with live_gateway.client(key=ADMIN_KEY) as adm:
        created = adm.post("/admin/experiments", json={
            "alias": "ab", "id": "ab-live", "salt": "s1",
            "arms": [{"name": "control", "adapter": "alpha"}, {"name": "bravo", "adapter": "bravo"}],
        })  # fmt: skip
        assert created.status_code == 201, created.text
        try:
            seen: dict[str, str] = {}
            thumbs = 0
            for i in range(24):
                user = f"user-{i}"
                for _ in range(2):  # sticky: a user's two requests land on the same arm
                    resp, text = chat(live_gateway, "ab", user)
                    arm = resp.headers["x-loraloop-arm"]
                    assert seen.setdefault(user, arm) == arm
                    assert resp.headers["x-loraloop-experiment"] == "ab-live"
                    assert text == ("bravo" if arm == "bravo" else "alpha")  # the arm's adapter really served it
                rid = resp.headers["x-request-id"]
                with live_gateway.client() as c:
                    fb = c.post("/v1/feedback", json={"request_id": rid, "kind": "thumbs", "value": arm == "bravo",
                                                      "user": user, "feedback_id": f"fb-{i}"})  # fmt: skip
                    assert fb.status_code == 201, fb.text
                    again = c.post("/v1/feedback", json={"request_id": rid, "kind": "thumbs", "value": arm == "bravo",
                                                         "user": user, "feedback_id": f"fb-{i}"})  # fmt: skip
                    assert again.status_code == 200 and again.json()["created"] is False  # idempotent retry
                thumbs += 1
            assert set(seen.values()) == {"control", "bravo"}
            live_gateway.app.state.store.flush()
            report = build_report(root, "ab-live")
            arms = {a.name: a for a in report.arms}
            assert sum(a.requests for a in arms.values()) == 48
            assert sum(a.users for a in arms.values()) == 24
            assert arms["bravo"].requests == 2 * sum(1 for a in seen.values() if a == "bravo")
            assert sum(a.thumbs_up + a.thumbs_down for a in arms.values()) == thumbs  # retries not counted twice
            assert arms["bravo"].thumbs_down == 0 and arms["control"].thumbs_up == 0
            over_api = adm.get("/admin/experiments/ab-live/report").json()
            assert "bravo" in over_api["table"] and "control" in over_api["table"]
        finally:
            assert adm.post("/admin/experiments/ab-live/stop").status_code == 200


def test_report_cli_prints_and_plots(live_gateway: LiveGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setenv("LORALOOP_STORE__ROOT", str(live_gateway.settings.store.root))
    plot = tmp_path / "ab.png"
    assert cli(["report", "ab-live", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "control" in out and "bravo" in out
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_feedback_for_unknown_request_is_pending(live_gateway: LiveGateway) -> None:
    with live_gateway.client() as c:
        resp = c.post("/v1/feedback", json={"request_id": "chatcmpl-not-yet-logged", "kind": "score", "value": 4})
        assert resp.status_code == 201
        bad = c.post("/v1/feedback", json={"request_id": "x", "kind": "score", "value": "lots"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "value"
        missing = c.post("/v1/feedback", json={"kind": "thumbs", "value": True})
        assert missing.status_code == 400
    live_gateway.app.state.store.flush()
    assert StoreReader(live_gateway.settings.store.root).pending_feedback_count() >= 1


def test_privacy_switch_and_request_fields(live_gateway: LiveGateway) -> None:
    resp, _ = chat(live_gateway, "private", "u-private", content="my secret diagnosis")
    public, text = chat(live_gateway, "tiny-greedy", "u-public", content="a public question")
    live_gateway.app.state.store.flush()
    con = StoreReader(live_gateway.settings.store.root).connect()
    private_row = con.execute(
        "SELECT messages, completion, prompt_tokens, completion_tokens, status FROM requests WHERE request_id = ?",
        [resp.headers["x-request-id"]],
    ).fetchone()
    public_row = con.execute(
        'SELECT completion, "user", latency_ms, alias, adapter, replica FROM requests WHERE request_id = ?',
        [public.headers["x-request-id"]],
    ).fetchone()
    assert private_row is not None and private_row[0] is None and private_row[1] is None
    assert private_row[2] and private_row[3] and private_row[4] == 200
    assert public_row is not None and public_row[0] == text and public_row[1] == "u-public"
    assert public_row[2] > 0 and public_row[3:] == ("tiny-greedy", None, "live")
