"""Child-process entry points for the concurrency and crash tests (run with `python -m`)."""

from __future__ import annotations

import sys
from pathlib import Path

from core.store_config import StoreConfig
from feedback.events import FeedbackEvent
from feedback.store import EventStore
from tests.feedback.conftest import make_request


def write_many(root: str, writer: str, requests: int, feedback: int) -> None:
    """Write ``requests`` request events and ``feedback`` feedback events, sealing often."""
    config = StoreConfig(root=Path(root), seal_rows=250, flush_interval_s=0.005, batch_size=50)
    with EventStore(config, writer) as store:
        for i in range(requests):
            store.submit(make_request(f"{writer}-{i}", replica=writer))
            if i < feedback:
                store.write_feedback(
                    FeedbackEvent(feedback_id=f"{writer}-f{i}", request_id=f"r{writer}-{i}", kind="thumbs", value=i % 2)
                )


def crash_loop(root: str) -> None:
    """Write forever, printing each acknowledged feedback id (F id) and each flushed request count (R n)."""
    config = StoreConfig(root=Path(root), seal_rows=300, flush_interval_s=0.002, batch_size=20)
    store = EventStore(config, "crashy")
    store.start()
    print("STARTED", flush=True)
    i = 0
    while True:
        store.submit(make_request(f"c{i}"))
        i += 1
        if i % 7 == 0:
            fb, _ = store.write_feedback(FeedbackEvent(feedback_id=f"fb{i}", request_id=f"rc{i - 1}", kind="copy"))
            print(f"F {fb.feedback_id}", flush=True)
        if i % 25 == 0:
            store.flush()
            print(f"R {i}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "crash":
        crash_loop(sys.argv[2])
    else:
        write_many(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
