"""What the adapter check costs (serving.adapter_checks.validate_adapter, run before vLLM is asked to load
an adapter), and that it does not grow with the adapter's weights, against loading the tensors, in one run.

The check decides from adapter_config.json and the safetensors header alone — tests/test_adapter_checks.py
asserts that it reads no tensor; the time it takes is measured here, not in a test, because a loaded
machine makes any wall-clock bound in a test pass or fail by luck. Two adapters for the tiny base, rank 1
and rank 256 (256 times the weights); for each, the median time of a check and of loading its tensors with
safetensors (the first thing vLLM's load does), repeats interleaved. Printed: the times and, the figures
that hold on a shared machine, the ratios rank 256 / rank 1 (about 1 for the check) and check / load.

Run: `python bench/adapter_check.py [--repeats 200] [--rank 256] [--model DIR]` (`--model`: a tiny-preset
directory to use instead of building one).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import add_model, model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200, help="checks and loads timed per adapter (interleaved)")
    parser.add_argument("--rank", type=int, default=256, help="rank of the larger adapter (the smaller has rank 1)")
    add_model(parser)
    args = parser.parse_args()

    from safetensors.torch import load_file

    from serving.adapter_checks import WEIGHTS, BaseModelInfo, validate_adapter
    from tests.adapter_factory import make_label_adapter

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base_dir = Path(model_dir(args.model, tmp))
        base = BaseModelInfo.from_model_dir(base_dir)
        root = tmp / "adapters"
        ranks = (1, args.rank)
        # untrained (zero-delta) weights: the same bytes to check and load as a trained adapter's
        adapters = {r: make_label_adapter(base_dir, root / f"r{r}", "unused", rank=r, steps=0) for r in ranks}

        def check(r: int) -> None:
            validate_adapter(adapters[r], root=root, base=base, max_rank=args.rank)

        def load(r: int) -> None:
            load_file(adapters[r] / WEIGHTS)

        times: dict[tuple[str, int], list[float]] = {(op, r): [] for op in ("check", "load") for r in ranks}
        for _ in range(args.repeats + 1):  # the first round warms up (imports, page cache) and is dropped
            for r in ranks:
                for op, fn in (("check", check), ("load", load)):
                    start = time.perf_counter()
                    fn(r)
                    times[op, r].append(time.perf_counter() - start)
        med = {key: statistics.median(values[1:]) for key, values in times.items()}
        lo, hi = ranks
        for r in ranks:
            print(f"rank {r:>2} ({(adapters[r] / WEIGHTS).stat().st_size / 1024:.0f} KiB of weights), median of "
                  f"{args.repeats}: check {med['check', r] * 1000:.2f} ms, tensor load {med['load', r] * 1000:.2f} ms, "
                  f"check / load {med['check', r] / med['load', r]:.2f}")  # fmt: skip
        print(f"rank {hi} / rank {lo}: check {med['check', hi] / med['check', lo]:.2f}, "
              f"tensor load {med['load', hi] / med['load', lo]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
