"""Scoring a stored delta in fp32 vs under bf16 autocast: time per example and how many predictions change.

    SELECTUNE_DATA=<root> python scripts/bench/bench_eval_precision.py <run dir> [--split test] [--rounds 2]
        [--write docs/benchmarks.md]

Why: the final protocol scores a 10,000-image test set once per run, in fp32 (the trainer evaluates outside its
training autocast, so a score is the stored fp32 delta's, as `selectune eval` gives it), about 10 minutes of one
core at DINOv2's 112 px. bf16 could be cheaper where the CPU computes it natively (AVX512-BF16, AMX) and is
emulated, slower, where it does not (which `trainer.precision=auto` avoids); this measures by how much on the CPU
it runs on, which it names, and what it costs in agreement. One thread; fp32 and bf16 alternate in each round, so
both see the same load; the ratio is read within the run.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import head_commit, write_section


def cpu_name() -> str:
    """The CPU's model name and whether torch sees native bf16 on it."""
    from selectune.trainer import cpu_bf16_native, cpu_model

    native = cpu_bf16_native()
    return (f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()}; native bf16: {'yes' if native else 'no'}, so "
            f"`trainer.precision=auto` is {'bf16' if native else 'fp32'} here)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--split", default=None, help="the split to score (default: the run's first eval split)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from selectune.commands import delta_on_task, encode_splits
    from selectune.evaluation import predict

    delta, task, backbone, _ = delta_on_task(args.run)  # as `selectune eval` builds it: the base hash checked
    split_name = args.split or task.eval_splits[0]
    split = encode_splits(task, backbone, [split_name])[split_name]
    batch = int(delta.meta["config"]["trainer"]["eval_batch_size"])
    labels = split.labels.numpy()
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    outputs: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name in times:
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                outputs[name] = predict(backbone.model, split, batch, torch.device("cpu"))
            times[name].append(time.perf_counter() - t0)
    fp32, bf16 = (outputs[k].argmax(-1) for k in ("fp32", "bf16"))
    scores = {k: task.score(v, labels) for k, v in outputs.items()}
    best = {k: min(v) for k, v in times.items()}
    rows = len(split)
    lines = [f"Measured {date.today()} at {head_commit()} by `python scripts/bench/bench_eval_precision.py {args.run} "
             f"--split {split_name} --rounds {args.rounds}` on {cpu_name()}, torch {torch.__version__}, "
             f"one thread, the other core busy with a training run; the fastest of {args.rounds} rounds each.", "",
             "| task | method | split | rows | fp32 s/example | bf16 s/example | bf16 / fp32 | predictions changed | "
             "fp32 metrics | bf16 metrics |", "|---|---|---|---|---|---|---|---|---|---|",
             f"| {task.name} | {delta.meta['method']} | {split_name} | {rows:,} | {best['fp32'] / rows:.4f} | "
             f"{best['bf16'] / rows:.4f} | {best['bf16'] / best['fp32']:.2f} | "
             f"{int((fp32 != bf16).sum())} of {rows:,} | "
             + ", ".join(f"{m} {v:.2f}" for m, v in scores["fp32"].items()) + " | "
             + ", ".join(f"{m} {v:.2f}" for m, v in scores["bf16"].items()) + " |"]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(args.write, "bench:eval_precision", "### Scoring in fp32 vs bf16 autocast (a stored delta, "
                      "one split)\n\n" + text)


if __name__ == "__main__":
    main()
