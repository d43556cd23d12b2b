"""Step time and peak memory of the delta forms, measured in one run on the same batches.

    python scripts/bench_step.py [--seqs 64 128] [--rounds 3] [--steps 6] [--write docs/benchmarks.md]

Each (method, sequence length) runs in its own process (so peak memory is that method's alone): the
offline MiniLM, batch 32, random token batches from a fixed seed (identical for every method), AdamW,
2 warm-up steps, then `--steps` timed steps; the median is kept. Rounds alternate the method order
to spread the machine's noise; the table reports the median over rounds and the ratios to LoRA.
On CPU: wall time and the process's peak RSS. On CUDA: CUDA events and max_memory_allocated.
Methods are compared at the same trainable count: LoRA r=8 on query/value (73,728 values + head);
SparseDelta = SaRA restricted to the same query/value matrices with the same count; SaRA-all = the
same count spread over all six matrix types. sdiff_phase1 / udiff_phase1 = diff pruning's L0 phase
(hard-concrete gates on every pretrained tensor), compared with full fine-tuning. spt_lora (at LoRA
r=8's count; its probe runs before timing) and adalora (importance EMAs after every step) are the
other rows; the loop calls method.after_step as the trainer does.
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

from docsection import write_section

METHODS = {  # "{lora_count}": the stored count of LoRA r=8 on query/value (+ head) of the model benchmarked
    "full": ["recipe=glue/sst2_full"],
    "lora": ["recipe=glue/sst2_lora"],
    "sparse": ["recipe=glue/sst2_sara", "method.targets=[query,value]", "budget.fraction=null",
               "budget.count={lora_count}"],
    "sara_all": ["recipe=glue/sst2_sara", "budget.fraction=null", "budget.count={lora_count}"],
    "sdiff_phase1": ["recipe=glue/sst2_sdiff"],
    "udiff_phase1": ["recipe=glue/sst2_udiff"],
    "spt_lora": ["recipe=glue/sst2_spt_lora"],  # its budget: LoRA r=8's count, as above
    "adalora": ["recipe=glue/sst2_adalora"],  # b(0) = 1.5 b(T); importance EMAs every step
}


def count_ops(step) -> int:
    """Tensor operations dispatched by one call of `step` (forward, penalty, backward, optimiser): on a GPU
    each is at least one kernel launch, so this, not FLOPs, is what small elementwise-heavy steps cost."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    counter = Counter()
    with counter:
        step()
    return counter.n


def child(method: str, seq: int, steps: int, device_name: str, model: str, precision: str,
          ops_only: bool = False) -> dict:
    import resource

    import torch

    from selectune.backbone import load_backbone
    from selectune.commands import RunSpec
    from selectune.config import compose
    from selectune.methods import build_method
    from selectune.methods.base import ProbeBatches

    torch.manual_seed(0)
    shape = RunSpec.from_config(compose("train", [f"model={model}"])).model.config_overrides
    hidden, layers = shape.get("hidden_size", 384), shape.get("num_hidden_layers", 6)
    lora_count = layers * 2 * 8 * 2 * hidden + 2 * hidden + 2
    overrides = [o.format(lora_count=lora_count) for o in METHODS[method]]
    spec = RunSpec.from_config(compose("train", [*overrides, f"model={model}"]))
    backbone = load_backbone(spec.model, 2, False, None, 0)
    method_obj = build_method(spec.method, spec.budget.resolve(backbone.num_base_parameters))
    device = torch.device(device_name)
    net = backbone.model.to(device)
    g = torch.Generator().manual_seed(1234)
    batches = [(torch.randint(1000, 29000, (32, seq), generator=g), torch.randint(0, 2, (32,), generator=g))
               for _ in range(steps + 2)]
    probe = ProbeBatches(lambda n: ({"input_ids": ids.to(device), "labels": y.to(device)} for ids, y in batches[:n]),
                         lambda logits, labels: torch.nn.functional.cross_entropy(logits, labels))
    method_obj.attach(backbone, probe)  # SPT probes here (not timed: a one-off before training)
    method_obj.plan(1000, 100)  # a run long enough for AdaLoRA's schedule; the timed steps are its warm-up
    net.train()
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    optimizer = torch.optim.AdamW(method_obj.param_groups(1e-4, 0.01))
    cuda = device.type == "cuda"

    def train_step(ids: torch.Tensor, labels: torch.Tensor, i: int) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(net(input_ids=ids).logits.float(), labels)
        penalty = method_obj.penalty()
        (loss if penalty is None else loss + penalty).backward()
        optimizer.step()
        method_obj.after_step(i + 1)
        optimizer.zero_grad(set_to_none=True)

    if ops_only:  # the second step (the first builds the optimiser state)
        (ids, labels), (ids2, labels2) = batches[0], batches[1]
        train_step(ids.to(device), labels.to(device), 0)
        ops = count_ops(lambda: train_step(ids2.to(device), labels2.to(device), 1))
        return {"method": method, "seq": seq, "ops": ops, "trainable": method_obj.report().trainable}
    times = []
    for i, (ids, labels) in enumerate(batches):
        ids, labels = ids.to(device), labels.to(device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        train_step(ids, labels, i)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1000
        else:
            elapsed = time.perf_counter() - t0
        if i >= 2:
            times.append(elapsed)
    report = method_obj.report()
    peak = (torch.cuda.max_memory_allocated(device) if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"method": method, "seq": seq, "step_s": statistics.median(times), "peak_mb": peak / 2**20,
            "trainable": report.trainable, "memory": "cuda max_memory_allocated" if cuda else "peak RSS"}


def run_child(args: argparse.Namespace, env: dict[str, str], method: str, seq: int, *extra: str) -> dict:
    """One (method, sequence length) in its own process, so peak memory is that method's alone."""
    out = subprocess.run([sys.executable, __file__, "--child", method, str(seq), "--steps", str(args.steps),
                          "--device", args.device, "--model", args.model, "--precision", args.precision, *extra],
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
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--write", type=Path, default=None, help="replace this script's section in a Markdown file")
    parser.add_argument("--section", default=None,
                        help="section marker in --write (default: bench:step on CPU, bench:step_cuda on a GPU)")
    parser.add_argument("--count-ops", action="store_true",
                        help="count the tensor operations of one step per method instead of timing (section bench:ops)")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.steps, args.device, args.model,
                               args.precision, args.count_ops)))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.count_ops:
        write_ops_table(args, env)
        return
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.rounds):
        order = args.methods if r % 2 == 0 else list(reversed(args.methods))
        for seq in args.seqs:
            for method in order:
                result = run_child(args, env, method, seq)
                runs.setdefault((method, seq), []).append(result)
                print(f"round {r + 1}: {method:9s} seq {seq:4d}: {result['step_s']:.3f} s/step, "
                      f"{result['peak_mb']:.0f} MiB", flush=True)
    lines = ["| method | trainable | seq | s/step (median of rounds) | x LoRA time | x full FT time | "
             "peak memory MiB | memory vs LoRA | x full FT memory |", "|---|---|---|---|---|---|---|---|---|"]
    def median(method: str, seq: int, key: str) -> float | None:
        return statistics.median(x[key] for x in runs[(method, seq)]) if (method, seq) in runs else None

    for seq in args.seqs:
        lora_t, lora_m = median("lora", seq, "step_s"), median("lora", seq, "peak_mb")
        full_t, full_m = median("full", seq, "step_s"), median("full", seq, "peak_mb")
        for method in args.methods:
            t, m = median(method, seq, "step_s"), median(method, seq, "peak_mb")
            rt = f"{t / lora_t:.2f}" if lora_t else "n/a"
            rm = f"{100 * (m / lora_m - 1):+.1f}%" if lora_m else "n/a"
            ft = f"{t / full_t:.2f}" if full_t else "n/a"
            fm = f"{m / full_m:.2f}" if full_m else "n/a"
            lines.append(f"| {method} | {runs[(method, seq)][0]['trainable']:,} | {seq} | {t:.3f} | {rt} | {ft} | "
                         f"{m:.0f} | {rm} | {fm} |")
    import torch

    on_gpu = args.device.startswith("cuda")
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, device {args.device}"
               + (f" ({torch.cuda.get_device_name()})" if on_gpu else ""))
    command = "python scripts/bench_step.py " + " ".join(sys.argv[1:])
    body = (f"### Step time and memory per delta form{', on a GPU' if on_gpu else ''}\n\n"
            f"Generated {datetime.date.today()} by "
            f"`{command.strip()}` on {machine}. Model `{args.model}`, {args.precision}, batch 32, "
            f"{args.steps} timed steps per "
            f"process after 2 warm-up steps, {args.rounds} rounds; memory = {runs[next(iter(runs))][0]['memory']}.\n\n"
            + "\n".join(lines))
    print(body)
    if args.write:
        write_section(args.write, args.section or ("bench:step_cuda" if on_gpu else "bench:step"), body)


def write_ops_table(args: argparse.Namespace, env: dict[str, str]) -> None:
    lines = ["| method | trainable | operations per step | x full FT |", "|---|---|---|---|"]
    counts = {}
    for method in args.methods:
        counts[method] = run_child(args, env, method, args.seqs[0], "--count-ops")
    full = counts.get("full", {}).get("ops")
    for method, c in counts.items():
        lines.append(f"| {method} | {c['trainable']:,} | {c['ops']:,} | {c['ops'] / full:.1f} |" if full else
                     f"| {method} | {c['trainable']:,} | {c['ops']:,} | n/a |")
    command = "python scripts/bench_step.py " + " ".join(sys.argv[1:])
    body = (f"### Tensor operations per training step\n\n`{command.strip()}`: model `{args.model}`, "
            f"{args.precision}, device {args.device}, batch 32 x {args.seqs[0]} tokens; every operation "
            "dispatched by one step (forward, penalty, backward, AdamW) is counted. On a GPU each is at least "
            "one kernel launch.\n\n" + "\n".join(lines))
    print(body)
    if args.write:
        write_section(args.write, args.section or "bench:ops", body)


if __name__ == "__main__":
    main()
