"""What one elementwise pass over a flat phase-1 buffer costs on this CPU, by kind (ms, min and median).

    OMP_NUM_THREADS=1 python scripts/bench/bench_flat_ops.py [--n 11000000] [--reps 9]

--n: entries (MiniLM's flat pass gates 11.0M). Rows: a product into a fresh buffer vs into a kept one
(why `selectune.delta.hardconcrete.Workspace` exists: a fresh buffer of this size is mapped anew and
page-faulted in), an in-place pass, a sum, σ, logit with ε (the noise's transform) and `uniform_` (the
noise itself: the default generator's stream, one number at a time).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=11_000_000)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    x, kept = torch.rand(args.n), torch.empty(args.n)
    kept.uniform_()
    cases = {
        "x * 3 into a fresh buffer": lambda: x.mul(3.0),
        "x * 3 into a kept buffer": lambda: torch.mul(x, 3.0, out=kept),
        "in-place mul_": lambda: kept.mul_(1.0),
        "sum": lambda: kept.sum(),
        "sigmoid_ (in place)": lambda: kept.sigmoid_(),
        "logit_(eps) (in place)": lambda: kept.clamp_(0.1, 0.9).logit_(1e-6),
        "uniform_ (the noise, in place)": lambda: kept.uniform_(),
    }
    print(f"| {args.n:,} float32 entries, torch {torch.__version__}, {torch.get_num_threads()} thread(s) | "
          "min ms | median ms |\n|---|---|---|")
    for name, fn in cases.items():
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        print(f"| {name} | {1000 * min(times):.1f} | {1000 * statistics.median(times):.1f} |", flush=True)


if __name__ == "__main__":
    main()
