"""core.progress: whole lines (no carriage returns) when the output is not a terminal, a tqdm bar when it is."""

from __future__ import annotations

import io
import os
import pty

from core.progress import LineProgress, progress, progress_iter


def test_lines_at_each_tenth_and_no_carriage_returns() -> None:
    out = io.StringIO()
    with progress(200, "holdout", "req", out) as bar:
        assert isinstance(bar, LineProgress)
        for _ in range(200):
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split(",")[0] for line in lines] == [f"holdout: {n}/200 req ({n // 2}%)" for n in range(20, 201, 20)]


def test_partial_work_reports_its_final_count() -> None:
    out = io.StringIO()
    assert list(progress_iter(iter(range(7)), 30, "traffic", "req", out)) == list(range(7))
    assert out.getvalue().splitlines()[-1].startswith("traffic: 7/30 req (23%)")


def test_a_terminal_gets_tqdm() -> None:
    leader, follower = pty.openpty()
    try:
        with os.fdopen(follower, "w") as tty:
            bar = progress(3, "bar", "req", tty)
            assert type(bar).__module__.startswith("tqdm")
            bar.update(3)
            bar.close()
        assert b"\r" in os.read(leader, 4096)
    finally:
        os.close(leader)
