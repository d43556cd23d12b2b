"""The sparse weight gradient, three ways: why SparseDelta uses a sampled matrix product (SDDMM).

    python scripts/bench/bench_sparse_grad.py [--device cuda] [--write docs/benchmarks.md]

For MiniLM-shaped Linear weights and 0.5%-4% of their entries selected, times (median of 10) the
gradient of the selected entries computed as (a) torch.sparse.sampled_addmm on the entries' CSR
pattern (what selectune does), (b) the dense weight gradient dyᵀx then a gather (what a gradient mask
costs), (c) gathering token columns and summing (the chunked fallback). All three agree to 1e-3.
The last case is a BERT-base attention matrix at LoRA r=8's share (seq 128, batch 32). On CUDA
(CUDA-synchronised timings) it answers whether cuSPARSE's SDDMM is what makes SparseDelta 1.5x LoRA's
step time on a GPU (docs/benchmarks.md); on CPU the sampled product is the fastest of the three.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from selectune.delta import sparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import publish

CASES = [(2048, 384, 384, 0.04), (2048, 1536, 384, 0.005), (4096, 384, 1536, 0.005), (4096, 768, 768, 0.0208)]


def timed(fn, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(10):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(tokens: int, out_f: int, in_f: int, share: float, device: torch.device) -> str:
    torch.manual_seed(0)
    dy, x = torch.randn(tokens, out_f, device=device), torch.randn(tokens, in_f, device=device)
    nnz = int(share * out_f * in_f)
    idx = torch.randperm(out_f * in_f)[:nnz].sort().values.to(device=device, dtype=torch.int32)
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
    ms = [timed(fn, device) for fn in (sddmm, dense, gather)]
    return f"| {tokens} | {out_f} x {in_f} | {nnz:,} | " + " | ".join(f"{t:.2f} ms" for t in ms) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    rows = ["| tokens | weight (out x in) | entries | SDDMM (selectune) | dense grad + gather | column gather |",
            "|---|---|---|---|---|---|"]
    rows += [measure(*case, device) for case in CASES]
    where = f"CUDA ({torch.cuda.get_device_name(device)})" if on_gpu else "CPU"
    body = (f"### Sparse weight gradient{', on a GPU' if on_gpu else ''}\n\n`python scripts/bench/bench_sparse_grad.py"
            f"{' --device ' + args.device if on_gpu else ''}` (fp32, {where}, torch {torch.__version__}; "
            f"median of 10):\n\n" + "\n".join(rows))
    publish(body, args.write, "bench:sparse_grad_cuda" if on_gpu else "bench:sparse_grad")


if __name__ == "__main__":
    main()
