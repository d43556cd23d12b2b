"""Cheaper CPU steps, each against today's in one run: bf16 autocast vs fp32, length-grouped batches vs shuffled.

    OMP_NUM_THREADS=1 SELECTUNE_DATA=../shared/data python scripts/bench/bench_cheaper.py [--rounds 3] [--steps 6]
        [--tasks rte mrpc] [--write docs/benchmarks.md]

Precision: the offline MiniLM, full fine-tuning and LoRA r=8 (query/value), batch 32 × 64 random tokens
(selectune.profiling.StepBench, the trainer's step and AdamW), one model per precision built once; each round
times `--steps` steps of each (after 2 warm-up steps), the order alternating between rounds; median s/step.
Grouping: the task's real training split tokenised as the trainer does (90% after `task.validation=0.1`),
the batches of epoch 0 as `trainer.group_by_length=false/true` makes them (batch 32); padded tokens per epoch
counted exactly; s/epoch estimated from LoRA steps (bf16 where the CPU supports it) on the same evenly spaced
batch positions of each epoch (`--steps` per round, alternating), times the number of batches.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from selectune.profiling import prepare
from selectune.trainer import resolve_precision

from docsection import write_section


def time_steps(bench, start: int, steps: int) -> float:
    t0 = time.perf_counter()
    for i in range(start, start + steps):
        bench.step(i)
    return (time.perf_counter() - t0) / steps


def time_batches(split, model, optimizer, dtype, batches: list[list[int]]) -> float:
    """Mean seconds per training step on these real batches (LoRA's trainable tensors, the trainer's loss)."""
    t0 = time.perf_counter()
    for rows in batches:
        batch = split.batch(rows)
        labels = batch.pop("labels")
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(**batch).logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / len(batches)


def precision_rows(args: argparse.Namespace) -> list[str]:
    rows = ["| method | fp32 s/step | bf16 s/step | bf16 / fp32 | rounds (fp32; bf16) |", "|---|---|---|---|---|"]
    for method in ("full", "lora"):
        benches = {p: prepare([f"recipe=glue/mrpc_{method}"], seq=64, precision=p) for p in ("fp32", "bf16")}
        for bench in benches.values():
            time_steps(bench, 0, 2)
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for r in range(args.rounds):
            for p in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
                times[p].append(time_steps(benches[p], 2 + r * args.steps, args.steps))
        med = {p: statistics.median(v) for p, v in times.items()}
        rows.append(f"| {method} | {med['fp32']:.3f} | {med['bf16']:.3f} | {med['bf16'] / med['fp32']:.2f} | "
                    f"{' '.join(f'{t:.2f}' for t in times['fp32'])}; {' '.join(f'{t:.2f}' for t in times['bf16'])} |")
        print(rows[-1], flush=True)
    return rows


def grouping_rows(args: argparse.Namespace) -> list[str]:
    from selectune.commands import RunSpec, build
    from selectune.config import compose
    from selectune.tasks import load_task
    from selectune.tasks.batches import train_batches

    precision = resolve_precision("auto", torch.device("cpu"))
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    rows = ["| task | batches | padded tokens / epoch, shuffled | grouped | saved | est. s/epoch, shuffled | "
            f"grouped ({precision}) | grouped / shuffled |", "|---|---|---|---|---|---|---|---|"]
    for task_name in args.tasks:
        cfg = compose("train", [f"recipe=glue/{task_name}_lora", "task.validation=0.1"])
        spec = RunSpec.from_config(cfg)
        task = load_task(spec.task)
        backbone, method = build(spec, task)
        split = task.encode("train", backbone)
        method.attach(backbone)
        model = backbone.model.train()
        optimizer = torch.optim.AdamW(method.param_groups(5e-4, 0.01), lr=5e-4, fused=True)
        lengths = split.lengths()
        epochs = {"shuffled": train_batches(len(split), 32, 42, 0),
                  "grouped": train_batches(len(split), 32, 42, 0, lengths)}
        padded = {k: sum(len(b) * max(lengths[i] for i in b) for b in v) for k, v in epochs.items()}
        real = sum(lengths)
        n = len(epochs["shuffled"])
        times: dict[str, list[float]] = {"shuffled": [], "grouped": []}

        time_batches(split, model, optimizer, dtype, epochs["shuffled"][:2])
        for r in range(args.rounds):
            positions = [(r + k * args.rounds) * n // (args.steps * args.rounds) for k in range(args.steps)]
            for kind in (("shuffled", "grouped") if r % 2 == 0 else ("grouped", "shuffled")):
                times[kind].append(time_batches(split, model, optimizer, dtype, [epochs[kind][p] for p in positions]))
        est = {k: statistics.median(v) * n for k, v in times.items()}
        rows.append(f"| {task_name} | {n} | {padded['shuffled']:,} ({padded['shuffled'] / real:.2f}× the real "
                    f"{real:,}) | {padded['grouped']:,} ({padded['grouped'] / real:.2f}×) | "
                    f"{1 - padded['grouped'] / padded['shuffled']:.0%} | {est['shuffled']:.0f} | {est['grouped']:.0f}"
                    f" | {est['grouped'] / est['shuffled']:.2f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["precision", "grouping"])
    parser.add_argument("--write", type=Path, default=None, help="replace this script's section in a Markdown file")
    args = parser.parse_args()
    torch.manual_seed(0)
    head = (f"`OMP_NUM_THREADS={torch.get_num_threads()} python scripts/bench/bench_cheaper.py --rounds {args.rounds} "
            f"--steps {args.steps} --tasks {' '.join(args.tasks)}` — {datetime.date.today()}, {platform.machine()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), auto precision here: "
            f"{resolve_precision('auto', torch.device('cpu'))}")
    print(head, flush=True)
    body = [head, ""]
    if "precision" not in args.skip:
        body += precision_rows(args) + [""]
    if "grouping" not in args.skip:
        body += grouping_rows(args)
    if args.write:
        write_section(args.write, "benchmarks:cheaper", "\n".join(body))


if __name__ == "__main__":
    main()
