"""Step time and peak memory of the delta forms, measured in one run on the same batches.

    python scripts/bench/bench_step.py [--seqs 64 128] [--batches 8 32] [--rounds 3] [--steps 6]
                                       [--trees before=/path/to/old after=.] [--write docs/benchmarks.md]

Each (method, batch, sequence length) runs in its own process (so peak memory is that method's alone): the
offline MiniLM, batch 8 (the diff-pruning recipes' batch) and 32, random token batches from a fixed seed
(identical for every method), AdamW, gradient clipping at 1.0 per `clip` family as the trainer does it,
2 warm-up steps, then `--steps` timed steps; the median is kept. Rounds alternate the method order
to spread the machine's noise; the table reports the median (and the min) over rounds and the ratios to
LoRA and to full fine-tuning at the same batch. Beside the wall time, the process's CPU time per step
(time.process_time, all its threads): on a machine shared with other work, waiting for a core inflates
the wall time but not the CPU time, so its ratios are the steadier ones there. `--trees` runs every row
with each checkout on PYTHONPATH in turn (alternating within each round: old and new code on the same
batches in one run).
On CPU: wall time and the process's peak RSS. On CUDA: CUDA events and max_memory_allocated.
Methods are compared at the same trainable count: LoRA r=8 on query/value (73,728 values + head);
SparseDelta = SaRA restricted to the same query/value matrices with the same count; SaRA-all = the
same count spread over all six matrix types. sdiff_phase1 / udiff_phase1 = diff pruning's L0 phase
(hard-concrete gates on every pretrained tensor), compared with full fine-tuning. spt_lora (at LoRA
r=8's count; its probe runs before timing) and adalora (importance EMAs after every step) are the
other rows; the loop calls method.after_step as the trainer does. lora_all = LoRA r=8 on the six matrix
types AdaLoRA adapts (its forward/backward twin: AdaLoRA's own bookkeeping is what differs). The step
itself is selectune.profiling.StepBench (AdamW as the trainer builds it: fused on CUDA and CPU);
--count-ops counts it with selectune.profiling.OpCounter; --model-path measures a local copy of the
model's weights (e.g. fp16 weights carried to a GPU machine, trained in fp32).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import publish

METHODS = {  # "{lora_count}": the stored count of LoRA r=8 on query/value (+ head) of the model benchmarked
    "full": ["recipe=glue/sst2_full"],
    "lora": ["recipe=glue/sst2_lora"],
    "lora_all": ["recipe=glue/sst2_lora",  # AdaLoRA's structural twin: r=8 on the six matrix types it adapts
                 "method.targets=[query,key,value,attention.output.dense,intermediate.dense,output.dense]"],
    "sparse": ["recipe=glue/sst2_sara", "method.targets=[query,value]", "budget.fraction=null",
               "budget.count={lora_count}"],
    "sara_all": ["recipe=glue/sst2_sara", "budget.fraction=null", "budget.count={lora_count}"],
    "sdiff_phase1": ["recipe=glue/sst2_sdiff"],
    "udiff_phase1": ["recipe=glue/sst2_udiff"],
    "spt_lora": ["recipe=glue/sst2_spt_lora"],  # its budget: LoRA r=8's count, as above
    "adalora": ["recipe=glue/sst2_adalora"],  # b(0) = 1.5 b(T); importance EMAs every step
}


def method_overrides(method: str, model: str) -> list[str]:
    """The config overrides of one METHODS row on `model`, with LoRA r=8's count on that model's shape."""
    from selectune.commands import RunSpec
    from selectune.config import compose

    shape = RunSpec.from_config(compose("train", [f"model={model}"])).model.config_overrides
    hidden, layers = shape.get("hidden_size", 384), shape.get("num_hidden_layers", 6)
    lora_count = layers * 2 * 8 * 2 * hidden + 2 * hidden + 2
    return [o.format(lora_count=lora_count) for o in METHODS[method]] + [f"model={model}"]


def clip_before_step(optimizer, max_norm: float = 1.0) -> None:
    """Clip gradients before every step of `optimizer` as the trainer does (`Trainer._clip`: per `clip`
    family of groups, default all together), as a step pre-hook so that any checkout's StepBench runs it."""
    import torch

    def hook(opt, args, kwargs) -> None:
        families: dict[str, list] = {}
        for group in opt.param_groups:
            families.setdefault(group.get("clip", "all"), []).extend(group["params"])
        for params in families.values():
            torch.nn.utils.clip_grad_norm_(params, max_norm)

    optimizer.register_step_pre_hook(hook)


def child(method: str, seq: int, steps: int, device_name: str, model: str, precision: str,
          ops_only: bool = False, model_path: str | None = None, batch: int = 32) -> dict:
    import resource

    import torch

    from selectune.profiling import count_steps, prepare

    bench = prepare(method_overrides(method, model), seq, batch=batch, n_batches=steps + 2, device=device_name,
                    precision=precision, model_path=model_path, adamw_mode="foreach" if ops_only else "trainer")
    if ops_only:  # the second step (the first builds the optimiser state)
        counter = count_steps(bench, [1])[0]
        return {"method": method, "seq": seq, "ops": counter.total, "kernels": counter.kernels,
                "syncs": counter.sync_count, "sync_ops": dict(counter.syncs),
                "trainable": bench.method.report().trainable}
    cuda = bench.device.type == "cuda"
    times, cpu_times = [], []
    clipped = None
    for i in range(steps + 2):
        if bench.optimizer is not clipped:  # built anew at a re-selection: hook the new one too
            clip_before_step(bench.optimizer)
            clipped = bench.optimizer
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0, c0 = time.perf_counter(), time.process_time()
        bench.step(i)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1000
        else:
            elapsed = time.perf_counter() - t0
        if i >= 2:
            times.append(elapsed)
            cpu_times.append(time.process_time() - c0)
    report = bench.method.report()
    peak = (torch.cuda.max_memory_allocated(bench.device) if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"method": method, "seq": seq, "batch": batch, "step_s": statistics.median(times),
            "cpu_s": statistics.median(cpu_times), "peak_mb": peak / 2**20,
            "trainable": report.trainable, "memory": "cuda max_memory_allocated" if cuda else "peak RSS"}


def run_child(args: argparse.Namespace, env: dict[str, str], method: str, seq: int, *extra: str,
              batch: int = 32) -> dict:
    """One (method, batch, sequence length) in its own process, so peak memory is that method's alone."""
    out = subprocess.run([sys.executable, __file__, "--child", method, str(seq), "--batch", str(batch),
                          "--steps", str(args.steps),
                          "--device", args.device, "--model", args.model, "--precision", args.precision,
                          *(["--model-path", args.model_path] if args.model_path else []), *extra],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="minilm", help="model config: minilm, bert_base_random, ...")
    parser.add_argument("--model-path", default=None,
                        help="a local weights folder for --model (e.g. fp16 weights carried offline; trained in fp32)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--write", type=Path, default=None, help="replace this script's section in a Markdown file")
    parser.add_argument("--section", default=None,
                        help="section marker in --write (default: bench:step on CPU, bench:step_cuda on a GPU)")
    parser.add_argument("--count-ops", action="store_true",
                        help="count the tensor operations of one step per method instead of timing (section bench:ops)")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32],
                        help="batch sizes (8: the diff-pruning recipes'; 32: the others')")
    parser.add_argument("--trees", nargs="+", default=[], metavar="LABEL=PATH",
                        help="time each row with each of these checkouts on PYTHONPATH in turn (e.g. before=/tmp/old "
                             "after=.), alternating within every round")
    parser.add_argument("--from-log", type=Path, default=None,
                        help="build the table from the per-round lines this script printed (a run cut short) "
                             "instead of running; give the same --methods/--batches/--seqs/--trees")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "SEQ"), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.steps, args.device, args.model,
                               args.precision, args.count_ops, args.model_path, args.batch)))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.count_ops:
        write_ops_table(args, env)
        return
    trees = [tuple(t.split("=", 1)) for t in args.trees] or [("", "")]
    envs = {label: {**env, "PYTHONPATH": str(Path(path).resolve())} if path else env for label, path in trees}
    runs: dict[tuple[str, str, int, int], list[dict]] = read_log(args.from_log) if args.from_log else {}
    if args.from_log:
        args.rounds = max(len(v) for v in runs.values())
    for r in range(0 if args.from_log else args.rounds):
        order = args.methods if r % 2 == 0 else list(reversed(args.methods))
        labels = [label for label, _ in trees]
        for batch in args.batches:
            for seq in args.seqs:
                for method in order:
                    for label in labels if r % 2 == 0 else list(reversed(labels)):
                        result = run_child(args, envs[label], method, seq, batch=batch)
                        runs.setdefault((label, method, batch, seq), []).append(result)
                        print(f"round {r + 1}: {label + ' ' if label else ''}{method:9s} batch {batch:3d} "
                              f"seq {seq:4d}: {result['step_s']:.3f} s/step, CPU {result['cpu_s']:.3f} s/step, "
                              f"{result['peak_mb']:.0f} MiB, trainable {result['trainable']:,}", flush=True)
    lines = ["| method | " + ("code | " if args.trees else "") + "trainable | batch | seq | "
             "s/step (median of rounds) | min of rounds | CPU s/step (median) | CPU min | x LoRA time | "
             "x full FT time | x full FT CPU time (medians) | x full FT CPU time (mins) | "
             "peak memory MiB | memory vs LoRA | x full FT memory |",
             "|---|" + ("---|" if args.trees else "") + "---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def median(label: str, method: str, batch: int, seq: int, key: str) -> float | None:
        rows = runs.get((label, method, batch, seq))
        return statistics.median(x[key] for x in rows) if rows else None

    for label, _ in trees:
        for batch in args.batches:
            for seq in args.seqs:
                lora_t, lora_m = (median(label, "lora", batch, seq, k) for k in ("step_s", "peak_mb"))
                full_t, full_m = (median(label, "full", batch, seq, k) for k in ("step_s", "peak_mb"))
                for method in args.methods:
                    if (label, method, batch, seq) not in runs:  # a run cut short (--from-log)
                        continue
                    t, m = (median(label, method, batch, seq, k) for k in ("step_s", "peak_mb"))
                    own, full = runs[(label, method, batch, seq)], runs.get((label, "full", batch, seq))
                    fastest = min(x["step_s"] for x in own)
                    cpu, cpu_min = statistics.median(x["cpu_s"] for x in own), min(x["cpu_s"] for x in own)
                    full_cpu = statistics.median(x["cpu_s"] for x in full) if full else None
                    full_cpu_min = min(x["cpu_s"] for x in full) if full else None
                    rt = f"{t / lora_t:.2f}" if lora_t else "n/a"
                    rm = f"{100 * (m / lora_m - 1):+.1f}%" if lora_m else "n/a"
                    ft = f"{t / full_t:.2f}" if full_t else "n/a"
                    fc = f"{cpu / full_cpu:.2f}" if full_cpu else "n/a"
                    fcm = f"{cpu_min / full_cpu_min:.2f}" if full_cpu_min else "n/a"
                    fm = f"{m / full_m:.2f}" if full_m else "n/a"
                    trainable = runs[(label, method, batch, seq)][0].get("trainable")
                    trainable = f"{trainable:,}" if trainable else "n/a"
                    lines.append(f"| {method} | " + (f"{label} | " if args.trees else "")
                                 + f"{trainable} | {batch} | {seq} | {t:.3f} | {fastest:.3f} | {cpu:.3f} | "
                                 f"{cpu_min:.3f} | {rt} | {ft} | {fc} | {fcm} | {m:.0f} | {rm} | {fm} |")
    import torch

    on_gpu = args.device.startswith("cuda")
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, device {args.device}"
               + (f" ({torch.cuda.get_device_name()})" if on_gpu else ""))
    command = "python scripts/bench/bench_step.py " + " ".join(sys.argv[1:])
    threads = os.environ.get("OMP_NUM_THREADS")
    body = (f"### Step time and memory per delta form{', on a GPU' if on_gpu else ''}\n\n"
            f"Generated {datetime.date.today()} by "
            f"`{('OMP_NUM_THREADS=' + threads + ' ') if threads else ''}{command.strip()}` on {machine}. "
            f"Model `{args.model}`, {args.precision}, batch {' and '.join(map(str, args.batches))}, "
            f"{args.steps} timed steps per process after 2 warm-up steps (their median), gradients clipped as the "
            f"trainer does, {args.rounds} rounds; "
            + (f"code: {', '.join(f'{label} = {path}' for label, path in trees)}, alternating in every round; "
               if args.trees else "")
            + (f"table built from the per-round lines of that run (`--from-log`), {args.rounds} rounds completed; "
               if args.from_log else "")
            + f"memory = {runs[next(iter(runs))][0].get('memory', 'peak RSS' if not on_gpu else 'cuda')}.\n\n"
            + "\n".join(lines))
    publish(body, args.write, args.section or ("bench:step_cuda" if on_gpu else "bench:step"))


def read_log(path: Path) -> dict[tuple[str, str, int, int], list[dict]]:
    """The results of the per-round lines a run of this script printed: {(code, method, batch, seq): [...]}."""
    import re

    pattern = re.compile(r"round (\d+): (.+?)\s+batch\s+(\d+) seq\s+(\d+): ([\d.]+) s/step, CPU ([\d.]+) s/step, "
                         r"(\d+) MiB(?:, trainable ([\d,]+))?")
    runs: dict[tuple[str, str, int, int], list[dict]] = {}
    for line in path.read_text().splitlines():
        match = pattern.match(line)
        if match:
            _, names, batch, seq, step_s, cpu_s, peak, trainable = match.groups()
            label, method = names.split() if len(names.split()) == 2 else ("", names.strip())
            runs.setdefault((label, method, int(batch), int(seq)), []).append(
                {"step_s": float(step_s), "cpu_s": float(cpu_s), "peak_mb": float(peak),
                 "trainable": int(trainable.replace(",", "")) if trainable else None})
    return runs


def write_ops_table(args: argparse.Namespace, env: dict[str, str]) -> None:
    """Operations of one step per method (selectune.profiling.OpCounter), with the ratios the GPU work
    is judged by: kernel-like operations vs LoRA's and full FT's, and the sync-prone operations."""
    counts = {method: run_child(args, env, method, args.seqs[0], "--count-ops") for method in args.methods}
    lora, full = (counts.get(m, {}).get("kernels") for m in ("lora", "full"))
    lines = ["| method | trainable | all operations | kernel-like | x LoRA | x full FT | sync-prone |",
             "|---|---|---|---|---|---|---|"]
    for method, c in counts.items():
        syncs = ", ".join(f"{k} {v}" for k, v in sorted(c["sync_ops"].items())) or "0"
        lines.append(f"| {method} | {c['trainable']:,} | {c['ops']:,} | {c['kernels']:,} | "
                     f"{c['kernels'] / lora:.2f} | " if lora else f"| {method} | {c['trainable']:,} | "
                     f"{c['ops']:,} | {c['kernels']:,} | n/a | ")
        lines[-1] += (f"{c['kernels'] / full:.2f} | " if full else "n/a | ") + f"{syncs} |"
    command = "python scripts/bench/bench_step.py " + " ".join(sys.argv[1:])
    body = (f"### Tensor operations per training step\n\n`{command.strip()}`: model `{args.model}`"
            f"{' from ' + args.model_path if args.model_path else ''}, {args.precision}, device {args.device}, "
            f"batch 32 x {args.seqs[0]} tokens, the second step (forward, penalty, backward, AdamW as the trainer "
            "builds it, but foreach: the unit of the op budgets, after_step). Kernel-like = every dispatched "
            "operation but views, aliases and detach: on a GPU each is at least one kernel launch. Sync-prone = "
            "operations "
            "whose CUDA kernel makes the host wait (bincount, nonzero, item, boolean-mask indexing, "
            "repeat_interleave without output_size, unique), counted by `selectune.profiling.OpCounter`.\n\n"
            + "\n".join(lines))
    publish(body, args.write, args.section or "bench:ops")


if __name__ == "__main__":
    main()
