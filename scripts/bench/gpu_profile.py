"""Per-method profile of one training step: kernels, host syncs, GPU-busy fraction and peak memory.

    python scripts/bench/gpu_profile.py --device cuda [--model minilm] [--seq 128] [--steps 5]
                                        [--write docs/benchmarks.md]
    python scripts/bench/gpu_profile.py --device cpu --model tiny_random --seq 16 --steps 2   (a dry run)

Each method is built by selectune.profiling.prepare (the step bench_step.py times), warmed up for 3 steps
(the first builds AdamW's state, SPT probes before), then measured over `--steps` steps:
  - dispatched / kernel-like / sync-prone operations per step: selectune.profiling.OpCounter;
  - on CUDA: kernels per step and the GPU-busy fraction (union of kernel intervals / wall time of the
    steps) from torch.profiler, host syncs per step from torch.cuda.set_sync_debug_mode("warn") (each
    synchronizing call warns once), and torch.cuda.max_memory_allocated;
  - on CPU: those three columns are "n/a" and memory is the process's peak RSS.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import torch
from bench_step import METHODS, method_overrides

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import publish


def cuda_profile(bench, first: int, steps: int) -> tuple[float, float]:
    """(kernels per step, GPU-busy fraction) over `steps` steps from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for i in range(first, first + steps):
            bench.step(i)
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    intervals = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, end = 0.0, float("-inf")
    for start, stop in intervals:  # union of the kernels' time ranges
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return len(kernels) / steps, min(1.0, busy / wall_us)


def cuda_syncs(bench, first: int, steps: int) -> float:
    """Synchronizing CUDA calls per step, as torch's sync debug mode reports them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(first, first + steps):
                bench.step(i)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def profile_method(method: str, args: argparse.Namespace) -> dict:
    from selectune.profiling import prepare

    bench = prepare(method_overrides(method, args.model), args.seq, batch=args.batch, n_batches=8,
                    device=args.device, model_path=args.model_path)
    cuda = bench.device.type == "cuda"
    for i in range(3):
        bench.step(i)
    counter = bench.count(3)
    row = {"method": method, "ops": counter.total, "kernel_like": counter.kernels, "sync_prone": counter.sync_count,
           "kernels": None, "syncs": None, "busy": None}
    if cuda:
        torch.cuda.reset_peak_memory_stats(bench.device)
        row["kernels"], row["busy"] = cuda_profile(bench, 4, args.steps)
        row["syncs"] = cuda_syncs(bench, 4 + args.steps, args.steps)
        row["peak_mb"] = torch.cuda.max_memory_allocated(bench.device) / 2**20
    else:
        for i in range(4, 4 + args.steps):
            bench.step(i)
        row["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del bench
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--model-path", default=None, help="a local weights folder for --model")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--write", type=Path, default=None, help="replace section bench:gpu_profile of this file")
    args = parser.parse_args()
    rows = []
    for method in args.methods:
        row = profile_method(method, args)
        rows.append(row)
        print(f"{method}: {row}", flush=True)

    def fmt(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = ["| method | dispatched ops | kernel-like | sync-prone (dispatch) | CUDA kernels/step | host syncs/step "
             "| GPU-busy fraction | peak memory MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ops']:,} | {r['kernel_like']:,} | {r['sync_prone']} | "
                     f"{fmt(r['kernels'], '.0f')} | {fmt(r['syncs'], '.1f')} | {fmt(r['busy'], '.2f')} | "
                     f"{r['peak_mb']:.0f} |")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU (dry run: no GPU columns)"
    model = args.model + (f" from {args.model_path}" if args.model_path else "")
    body = (f"### Per-method step profile\n\nGenerated {datetime.date.today()} by `python scripts/bench/gpu_profile.py "
            f"{' '.join(sys.argv[1:])}` on {device}, torch {torch.__version__}, {os.cpu_count()} CPU cores. Model "
            f"`{model}`, fp32, batch {args.batch} x {args.seq} tokens; counts of step 4, profiler over {args.steps} "
            "steps, sync debug mode over the next ones; peak memory over the profiled steps.\n\n" + "\n".join(lines))
    publish(body, args.write, "bench:gpu_profile")


if __name__ == "__main__":
    main()
