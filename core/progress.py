"""Progress for long interactive work: a tqdm bar on a terminal, whole lines elsewhere.

tqdm redraws its bar with carriage returns; in a cron mail, a CI log or ``kubectl logs`` that is one
ever-growing line of frames. When the stream is not a terminal, ``progress`` writes a plain line instead at
every tenth of the work (and at the end), e.g. ``holdout: 40/80 req (50%), 12.5 req/s``."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, Protocol, TypeVar

T = TypeVar("T")


class Progress(Protocol):
    def update(self, n: int = 1) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> Progress: ...
    def __exit__(self, exc_type: Any, exc: Any, tb: Any, /) -> None: ...


class LineProgress:
    """tqdm's ``update``/``close``, written as one line per tenth of ``total``."""

    def __init__(self, total: int, desc: str, unit: str, stream: IO[str], steps: int = 10) -> None:
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.n, self.started, self.closed = 0, time.monotonic(), False
        self.marks = sorted({max(1, round(total * k / steps)) for k in range(1, steps + 1)}) if total > 0 else []

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if any(before < mark <= self.n for mark in self.marks):
            self._line()

    def _line(self) -> None:
        rate = self.n / max(time.monotonic() - self.started, 1e-9)
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{share}, {rate:.1f} {self.unit}/s",
              file=self.stream, flush=True)  # fmt: skip

    def close(self) -> None:
        if not self.closed and (self.n == 0 or self.n not in self.marks):
            self._line()  # the final count, unless the last mark just printed it
        self.closed = True

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any, /) -> None:
        self.close()


def is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress(total: int, desc: str, unit: str = "it", stream: IO[str] | None = None) -> Progress:
    """A tqdm bar on a terminal, a LineProgress anywhere else (both on stderr by default)."""
    out = stream if stream is not None else sys.stderr
    if is_terminal(out):
        from tqdm import tqdm

        bar: Progress = tqdm(total=total, desc=desc, unit=unit, file=out)
        return bar
    return LineProgress(total, desc, unit, out)


def progress_iter(items: Iterable[T], total: int, desc: str, unit: str = "it", stream: IO[str] | None = None
                  ) -> Iterator[T]:  # fmt: skip
    """``items`` with progress (see ``progress``)."""
    with progress(total, desc, unit, stream) as bar:
        for item in items:
            yield item
            bar.update(1)


__all__ = ["LineProgress", "Progress", "is_terminal", "progress", "progress_iter"]
