"""Adapters at runtime against a real vLLM CPU server: hot-swapping an alias under concurrent streaming
and non-streaming load costs no request and switches outputs, hostile adapters are refused while
serving continues, and the admin API is locked."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests import adapter_factory as af
from tests.conftest import ADMIN_KEY, API_KEY, LiveGateway

pytestmark = pytest.mark.integration

PROMPTS = ["Is this review positive?", "Rate this product please.", "What do you think of it?", "Label this one."]
PER_WINDOW = 4  # requests that must run entirely between two switches (both kinds come: the workers alternate)


@dataclass
class Outcome:
    started: float
    ended: float
    status: int
    text: str
    stream: bool


def one_request(client: httpx.Client, alias: str, prompt: str, stream: bool) -> Outcome:
    body = {"model": alias, "messages": [{"role": "user", "content": prompt}], "stream": stream}
    started = time.monotonic()
    if not stream:
        resp = client.post("/v1/chat/completions", json=body)
        text = resp.json()["choices"][0]["message"]["content"] if resp.status_code == 200 else resp.text
        return Outcome(started, time.monotonic(), resp.status_code, text, False)
    parts: list[str] = []
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        status = resp.status_code
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    status = 599
                    parts.append(str(chunk["error"]))
                elif chunk["choices"]:
                    parts.append(chunk["choices"][0]["delta"].get("content") or "")
    return Outcome(started, time.monotonic(), status, "".join(parts), True)


class Load:
    """Worker threads sending requests for `alias` until stopped."""

    def __init__(self, live: LiveGateway, alias: str, workers: int = 4) -> None:
        self.outcomes: list[Outcome] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, args=(live, alias, i), daemon=True) for i in range(workers)
        ]

    def _work(self, live: LiveGateway, alias: str, i: int) -> None:
        with live.client() as client:
            n = 0
            while not self._stop.is_set():
                try:
                    out = one_request(client, alias, PROMPTS[(i + n) % len(PROMPTS)], stream=(i + n) % 2 == 0)
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.errors.append(repr(exc))
                    continue
                with self._lock:
                    self.outcomes.append(out)
                n += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        # serving is under way before the caller's section starts: a short section (the hostile
        # adapter checks take about a second) must not end before the workers sent anything
        deadline = time.monotonic() + 120
        while not (self.outcomes or self.errors):
            assert time.monotonic() < deadline, "no request of the load finished within 120 s"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def count(self, started_after: float) -> int:
        """How many requests that started after `started_after` have finished."""
        with self._lock:
            return sum(1 for o in self.outcomes if o.started > started_after)

    def wait_for(self, n: int, started_after: float, timeout_s: float = 180) -> None:
        """Until `n` requests that started after `started_after` have finished: a condition, not a fixed
        window, so a slow (loaded) machine only makes the test take longer."""
        deadline = time.monotonic() + timeout_s
        while self.count(started_after) < n:
            assert not self.errors, self.errors[:3]
            assert time.monotonic() < deadline, f"fewer than {n} requests finished within {timeout_s:g} s"
            time.sleep(0.02)


def admin(live: LiveGateway) -> httpx.Client:
    return live.client(key=ADMIN_KEY)


def poll(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def labeler_on_alpha(live_gateway: LiveGateway) -> Iterator[None]:
    """`labeler` points at alpha during the test and again after it, whatever the test did: the next test
    finds the session's gateway as configured, not as the test left it."""
    with admin(live_gateway) as adm:
        assert adm.put("/admin/aliases/labeler", json={"adapter": "alpha"}).status_code == 200
        yield
        assert adm.put("/admin/aliases/labeler", json={"adapter": "alpha"}).status_code == 200


def test_repoint_under_load_switches_outputs_without_failures(
    live_gateway: LiveGateway, labeler_on_alpha: None
) -> None:
    with admin(live_gateway) as adm:
        switches: list[tuple[float, str]] = []
        with Load(live_gateway, "labeler") as load:
            load.wait_for(PER_WINDOW, started_after=0)  # serving alpha under load before the first switch
            for target in ("bravo", "alpha", "bravo", "alpha", "bravo"):
                resp = adm.put("/admin/aliases/labeler", json={"adapter": target})
                assert resp.status_code == 200, resp.text
                switches.append((time.monotonic(), target))
                # the next switch only once enough requests ran entirely between this switch and the next
                load.wait_for(PER_WINDOW, started_after=switches[-1][0])
        assert load.errors == []
        failed = [o for o in load.outcomes if o.status != 200]
        assert failed == [], failed[:3]
        assert {o.text for o in load.outcomes} <= {"alpha", "bravo"}, {o.text for o in load.outcomes}
        assert {o.stream for o in load.outcomes} == {True, False}
        checked = 0
        for i, (at, target) in enumerate(switches):
            until = switches[i + 1][0] if i + 1 < len(switches) else float("inf")
            after = [o for o in load.outcomes if at < o.started and o.ended < until]
            assert len(after) >= PER_WINDOW, f"only {len(after)} requests fully inside switch window {i}"
            wrong = [o.text for o in after if o.text != target]
            assert wrong == [], f"after switching to {target}: {wrong}"
            checked += len(after)
        assert checked >= PER_WINDOW * len(switches)
        # an adapter no alias uses any more is unloaded once drained; one still in use stays
        assert adm.put("/admin/aliases/labeler", json={"adapter": None}).status_code == 200

        def loaded() -> list[str]:
            return list(next(iter(adm.get("/admin/adapters").json()["backends"].values())))

        poll(lambda: "bravo" not in loaded(), "bravo to be unloaded once no alias uses it")
        assert "alpha" in loaded()  # alpha: alias `ab` still points to it
        # an unloaded adapter stays registered: pointing at it again loads it again
        assert adm.put("/admin/aliases/labeler", json={"adapter": "bravo"}).status_code == 200
        assert "bravo" in loaded()
        with live_gateway.client() as client:
            assert one_request(client, "labeler", PROMPTS[0], stream=False).text == "bravo"


HOSTILE = {
    "outside_root": lambda root, tmp: "../../../etc",
    "absolute_elsewhere": lambda root, tmp: str(af.copy_adapter(root / "alpha", tmp / "elsewhere")),
    "symlink_escape": lambda root, tmp: af.escaping_dir_symlink(root / "alpha", root / "sneaky", tmp / "outside").name,
    "pickled_weights": lambda root, tmp: af.with_pickle(root / "alpha", root / "pickled").name,
    "base_mismatch": lambda root, tmp: af.with_base(root / "alpha", root / "other-base", "meta-llama/Other-7B").name,
    "rank_too_high": lambda root, tmp: af.with_rank(root / "alpha", root / "rank64", 64).name,
    "unknown_target_modules": lambda root, tmp: af.with_targets(root / "alpha", root / "ghost", ["ghost_proj"]).name,
    "corrupt_safetensors": lambda root, tmp: af.truncated(root / "alpha", root / "truncated").name,
    "corrupt_header": lambda root, tmp: af.corrupt_header(root / "alpha", root / "garbled").name,
    "shape_mismatch": lambda root, tmp: af.wrong_shapes(root / "alpha", root / "misshapen").name,
}
EXPECTED_CODE = {
    "absolute_elsewhere": "outside_root",
    "symlink_escape": "outside_root",
    "corrupt_header": "corrupt_safetensors",
}


def test_hostile_adapters_refused_while_serving(
    live_gateway: LiveGateway, label_adapters: Path, tmp_path: Path
) -> None:
    with admin(live_gateway) as adm, Load(live_gateway, "tiny-greedy", workers=2) as load:
        for name, make in HOSTILE.items():
            path = make(label_adapters, tmp_path)
            resp = adm.post("/admin/adapters", json={"name": f"h-{name.replace('_', '-')}", "path": str(path)})
            assert resp.status_code == 400, (name, resp.text)
            err = resp.json()["error"]
            assert err["code"] == EXPECTED_CODE.get(name, name), (name, err)
            assert err["message"] and "\n" not in err["message"]
        listing = adm.get("/admin/adapters").json()
    assert all(not n.startswith("h-") for n in (a["name"] for a in listing["data"]))
    for state in listing["backends"].values():
        assert not any(str(a).startswith("h-") for a in state)  # vLLM never saw them
    assert load.errors == [] and load.outcomes and all(o.status == 200 for o in load.outcomes)


def test_admin_requires_admin_key(live_gateway: LiveGateway) -> None:
    with live_gateway.client(key=None) as anon:
        assert anon.get("/admin/adapters").status_code == 401
    with live_gateway.client(key=API_KEY) as user:
        resp = user.put("/admin/aliases/labeler", json={"adapter": None})
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "admin_key_required"
