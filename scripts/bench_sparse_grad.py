"""The sparse weight gradient, three ways: why SparseDelta uses a sampled matrix product (SDDMM).

    python scripts/bench_sparse_grad.py [--write docs/benchmarks.md]

For MiniLM-shaped Linear weights and 0.5%-4% of their entries selected, times (median of 10) the
gradient of the selected entries computed as (a) torch.sparse.sampled_addmm on the entries' CSR
pattern (what selectune does), (b) the dense weight gradient dyᵀx then a gather (what a gradient mask
costs), (c) gathering token columns and summing (the chunked fallback). All three agree to 1e-3.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from selectune.delta import sparse

from docsection import write_section

CASES = [(2048, 384, 384, 0.04), (2048, 1536, 384, 0.005), (4096, 384, 1536, 0.005)]


def timed(fn) -> float:
    fn()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(tokens: int, out_f: int, in_f: int, share: float) -> str:
    torch.manual_seed(0)
    dy, x = torch.randn(tokens, out_f), torch.randn(tokens, in_f)
    nnz = int(share * out_f * in_f)
    idx = torch.randperm(out_f * in_f)[:nnz].sort().values.to(torch.int32)
    reference = (dy.t() @ x).reshape(-1)[idx.long()]
    rows, cols = idx.long() // in_f, idx.long() % in_f

    def sddmm():
        return sparse.sampled_weight_grad(dy, x, idx, (out_f, in_f))

    def dense():
        return (dy.t() @ x).reshape(-1)[idx.long()]

    def gather():
        return (dy[:, rows] * x[:, cols]).sum(0)

    for fn in (sddmm, gather):
        assert torch.allclose(fn(), reference, atol=1e-3)
    return (f"| {tokens} | {out_f} x {in_f} | {nnz:,} | {timed(sddmm):.1f} ms | {timed(dense):.1f} ms | "
            f"{timed(gather):.1f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    rows = ["| tokens | weight (out x in) | entries | SDDMM (selectune) | dense grad + gather | column gather |",
            "|---|---|---|---|---|---|"]
    rows += [measure(*case) for case in CASES]
    body = ("### Sparse weight gradient\n\n`python scripts/bench_sparse_grad.py` (fp32, CPU, torch "
            f"{torch.__version__}; median of 10):\n\n" + "\n".join(rows))
    print(body)
    if args.write:
        write_section(args.write, "bench:sparse_grad", body)


if __name__ == "__main__":
    main()
