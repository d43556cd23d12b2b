"""One base model in memory, many task deltas: switch time, memory, and exactness against exported models.

    SELECTUNE_DATA=../shared/data python scripts/bench/bench_switch.py runs/bench/* [--rounds 3] [--write docs/api.md]

Loads the stored deltas (run directories), one base model (the first run's model config) and, for
comparison, every delta exported with `selectune export` and loaded side by side as plain Hugging Face
models. Then switches between the tasks with `selectune.TaskSwitcher` in a seeded random order, and
after every switch checks the dev logits (each run's own dev slice) against that task's exported
model, and after every removal that the base's parameters are the same bits as before the first
switch. A switch = removing the previous task + applying the next (timed separately, summed).
Memory counts the bytes of tensors: the base's parameters and buffers + every delta's stored tensors
+ the most one active delta holds to undo itself, against the 8 exported models' parameters and buffers.
For LoRA / AdaLoRA runs it also exports `format=peft` and compares `PeftModel.from_pretrained(base,
dir)` with the switcher's logits and the in-training model's (`outputs_dev.npy`, written by train).
"""

from __future__ import annotations

import argparse
import datetime
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

import selectune
from selectune.api import active
from selectune.commands import RunSpec, build, encode_splits
from selectune.evaluation import predict
from selectune.export import export
from selectune.tasks import load_task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import publish

CPU = torch.device("cpu")
TOLERANCE = 1e-5


def tensor_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def load_runs(runs: list[Path]) -> tuple[dict, dict]:
    """Deltas and their run specs, by run name."""
    deltas, specs = {}, {}
    for run in runs:
        delta = selectune.load_delta(run)
        deltas[run.name], specs[run.name] = delta, RunSpec.from_config(OmegaConf.create(delta.meta["config"]))
    return deltas, specs


def dev_slice(spec: RunSpec, backbone) -> object:
    task = load_task(spec.task)
    return encode_splits(task, backbone, [task.eval_splits[0]])[task.eval_splits[0]]


def exported_logits(runs: list[Path], devs: dict, tmp: Path) -> tuple[dict, int]:
    """Export every delta, load all exports side by side, return their dev logits and their tensor bytes."""
    from transformers import AutoModelForSequenceClassification

    models = {}
    for run in runs:
        export(str(run), str(tmp / run.name))
        models[run.name] = AutoModelForSequenceClassification.from_pretrained(tmp / run.name).eval()
    logits = {name: predict(model, devs[name], 64, CPU) for name, model in models.items()}
    return logits, sum(tensor_bytes(m) for m in models.values())


def peft_check(runs: list[Path], deltas: dict, specs: dict, devs: dict, switched: dict, tmp: Path) -> list[str]:
    """format=peft for every LoRA / AdaLoRA run: PeftModel logits vs the switcher's and the in-training model's."""
    from peft import PeftModel

    lines = []
    for run in runs:
        groups = deltas[run.name].by_parameter().values()
        if not any("lora_A" in p or "svd_P" in p for p in groups) or any("indices" in p for p in groups):
            continue
        export(str(run), str(tmp / f"{run.name}_peft"), fmt="peft")
        spec = specs[run.name]
        base, _ = build(spec, load_task(spec.task))
        model = PeftModel.from_pretrained(base.model, tmp / f"{run.name}_peft").eval()
        theirs = predict(model, devs[run.name], 64, CPU)
        line = f"{run.name}: max |PeftModel − switcher| {np.abs(theirs - switched[run.name]).max():.2e}"
        trained = run / f"outputs_{load_task(spec.task).eval_splits[0]}.npy"
        if trained.exists():
            line += f", max |PeftModel − in-training model| {np.abs(theirs - np.load(trained)).max():.2e}"
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run directories (each with delta.safetensors)")
    parser.add_argument("--rounds", type=int, default=3, help="passes over all tasks, each in a new order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-peft", action="store_true", help="skip the format=peft check")
    parser.add_argument("--write", type=Path, help="put the results into this Markdown file's bench-switch section")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = sorted(r for r in args.runs if (r / "delta.safetensors").exists())
    deltas, specs = load_runs(runs)
    first = specs[runs[0].name]
    backbone, _ = build(first, load_task(first.task))
    model = backbone.model.eval()
    devs = {run.name: dev_slice(specs[run.name], backbone) for run in runs}
    base = {n: p.detach().clone() for n, p in model.named_parameters()}

    with tempfile.TemporaryDirectory() as tmp:
        reference, exported_bytes = exported_logits(runs, devs, Path(tmp))
        switcher = selectune.TaskSwitcher(model, deltas)
        order = [name for r in range(args.rounds) for name in random.Random(args.seed + r).sample(sorted(deltas),
                                                                                                    len(deltas))]
        applied, removed, diffs, held, switched = [], [], {}, 0, {}
        for name in order:
            t0 = time.perf_counter()
            switcher.switch(name)
            applied.append(time.perf_counter() - t0)
            held = max(held, active(model).held_bytes)
            logits = predict(model, devs[name], 64, CPU)
            switched[name] = logits
            diffs[name] = max(diffs.get(name, 0.0), float(np.abs(logits - reference[name]).max()))
            t0 = time.perf_counter()
            switcher.clear()
            removed.append(time.perf_counter() - t0)
            params = dict(model.named_parameters())
            if params.keys() != base.keys() or not all(torch.equal(params[n], base[n]) for n in base):
                raise SystemExit(f"after removing {name} the base is not bit-identical")
        peft_lines = [] if args.no_peft else peft_check(runs, deltas, specs, devs, switched, Path(tmp))

    switch = [removed[i - 1] + applied[i] for i in range(1, len(order))]
    base_bytes, delta_bytes = tensor_bytes(model), sum(d.nbytes for d in deltas.values())
    worst = max(diffs.values())
    mb = 2**20
    lines = [
        f"{len(deltas)} deltas ({', '.join(sorted(deltas))}) on {backbone.name}; {len(order)} switches "
        f"({args.rounds} rounds, seeded orders), 1 CPU thread, {datetime.date.today()}",
        "",
        "| | median | max |",
        "|---|---|---|",
        f"| switch (remove previous + apply next) | {1e3 * statistics.median(switch):.1f} ms | "
        f"{1e3 * max(switch):.1f} ms |",
        f"| apply | {1e3 * statistics.median(applied):.1f} ms | {1e3 * max(applied):.1f} ms |",
        f"| remove | {1e3 * statistics.median(removed):.1f} ms | {1e3 * max(removed):.1f} ms |",
        "",
        f"Memory (bytes of tensors): base {base_bytes / mb:.1f} MiB + {len(deltas)} deltas {delta_bytes / mb:.1f} MiB "
        f"+ at most {held / mb:.1f} MiB held by the active delta to undo itself = "
        f"**{(base_bytes + delta_bytes + held) / mb:.1f} MiB**, vs {len(deltas)} exported models side by side "
        f"**{exported_bytes / mb:.1f} MiB** ({exported_bytes / (base_bytes + delta_bytes + held):.1f}x).",
        "",
        f"Dev logits after every switch vs that task's exported model: max |diff| {worst:.2e} "
        f"(per task: {', '.join(f'{n} {d:.1e}' for n, d in sorted(diffs.items()))}); "
        f"after every removal the base's {len(base)} parameters were bit-identical to the original.",
    ]
    if peft_lines:
        lines += ["", "format=peft (`PeftModel.from_pretrained(base, dir)`, dev slice):", "",
                  *[f"- {line}" for line in peft_lines]]
    text = "\n".join(lines)
    publish(text, args.write, "bench-switch")
    if worst > TOLERANCE:
        raise SystemExit(f"logits differ from the exported models by {worst:.2e} > {TOLERANCE}")


if __name__ == "__main__":
    main()
