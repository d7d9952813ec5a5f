"""Readers during writes, two writer processes on one root, and kill -9 at a random moment."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core.store_config import StoreConfig
from feedback.events import FeedbackEvent
from feedback.reader import StoreReader
from feedback.store import EventStore
from tests.feedback.conftest import make_request

REPO = Path(__file__).resolve().parents[2]


def _child(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.feedback.writer_proc", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_reader_queries_while_writer_writes_and_seals(tmp_path: Path):
    config = StoreConfig(root=tmp_path, seal_rows=200, flush_interval_s=0.002, batch_size=20)
    total = 3000
    done = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            with EventStore(config, "gw") as store:
                for i in range(total):
                    store.submit(make_request(i))
                    if i % 10 == 0:
                        store.write_feedback(FeedbackEvent(feedback_id=f"f{i}", request_id=f"r{i}", kind="copy"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    seen: list[int] = []
    while not done.is_set():
        counts = StoreReader(tmp_path).counts()
        assert counts["feedback"] <= counts["requests"] // 10 + 1
        seen.append(counts["requests"])
    writer.join()
    assert not errors
    assert seen == sorted(seen), "a snapshot lost rows that an earlier one had"
    assert len(seen) >= 3
    final = StoreReader(tmp_path).counts()
    assert final["requests"] == total and final["feedback"] == total // 10


def test_two_writer_processes_and_a_reader_at_once(tmp_path: Path):
    procs = [_child("many", str(tmp_path), f"gw{k}", "1500", "300") for k in (1, 2)]
    reads = 0
    while any(p.poll() is None for p in procs):
        StoreReader(tmp_path).counts()  # must never fail while both write and seal
        reads += 1
    for p in procs:
        _, err = p.communicate()
        assert p.returncode == 0, err
    assert reads > 0
    con = StoreReader(tmp_path).connect()
    assert con.execute("SELECT count(*), count(DISTINCT request_id) FROM requests").fetchone() == (3000, 3000)
    assert con.execute("SELECT count(*) FROM feedback WHERE matched").fetchone() == (600,)
    assert con.execute("SELECT writer, count(*) FROM requests GROUP BY 1 ORDER BY 1").fetchall() == [
        ("gw1", 1500),
        ("gw2", 1500),
    ]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_loses_no_acknowledged_feedback_nor_flushed_request(tmp_path: Path, seed: int):
    proc = _child("crash", str(tmp_path))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []))
    reader.start()
    deadline = time.monotonic() + 30
    while not lines and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lines and lines[0].strip() == "STARTED", proc.stderr.read() if proc.stderr else ""
    time.sleep(random.Random(seed).uniform(0.2, 1.2))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join()
    acked = {ln.split()[1] for ln in lines if ln.startswith("F ")}
    flushed = max((int(ln.split()[1]) for ln in lines if ln.startswith("R ")), default=0)
    assert len(acked) > 10 and flushed > 100, (len(acked), flushed)

    with EventStore(StoreConfig(root=tmp_path), "crashy"):  # recovery: seals what the dead process left
        pass
    assert not list((tmp_path / "crashy").glob("wal-*.jsonl"))
    con = StoreReader(tmp_path).connect()
    stored_fb = {r[0] for r in con.execute("SELECT feedback_id FROM feedback").fetchall()}
    stored_rq = {r[0] for r in con.execute("SELECT request_id FROM requests").fetchall()}
    assert acked <= stored_fb
    assert {f"rc{i}" for i in range(flushed)} <= stored_rq
    assert con.execute("SELECT count(*) - count(DISTINCT request_id) FROM requests").fetchone() == (0,)
