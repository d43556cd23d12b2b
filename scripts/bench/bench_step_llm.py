"""Step time and peak memory per method on the decoder LLM (SmolLM2-135M), on real prompt batches.

    SELECTUNE_DATA=../shared/data python scripts/bench/bench_step_llm.py [--methods lora sara ...]
        [--steps 2] [--rounds 1] [--batch 8] [--precision fp32] [--model smollm2_135m] [--write docs/results.md]
        [--section bench:step_llm]

Each method runs in its own process (peak RSS is that method's alone): recipe `causal/sst2_<method>` (the
preset's method settings and budget), the first `batch x (steps + 1)` SST-2 training rows as prompts with
their answer (about 70 tokens a row with SmolLM2's chat frame), AdamW as the trainer builds it, one warm-up
step (the optimiser state), then `--steps` timed steps, each the trainer's forward -> answer-token loss +
penalty -> backward -> step -> after_step; the median is kept. `sparse` is SaRA on q_proj/v_proj at LoRA
r=8's count (460,800): the same trainable count as `lora`. `lora_all_logits` is `lora` with the LM head applied
at every position, as before batches named the positions the loss reads (`logits_to_keep`): what that saves.
`--rounds R` runs the method list R times in turn (lora, sparse, lora, sparse, ...) and keeps each method's
median over rounds, so a load change on a shared machine falls on every method alike; `--precision` is the
trainer's autocast (auto: bf16 on this CPU). CPU only here: wall time and peak RSS (which includes loading
and the method's set-up: SaRA's selection, SPT's probe).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import publish

METHODS = {
    "full": [],
    "lora": [],
    "lora_all_logits": [],
    "sparse": ["method.targets=[q_proj,v_proj]", "budget.fraction=null", "budget.count=460800"],
    "sara": [],
    "spt_lora": [],
    "adalora": [],
    "ia3": [],
    "sdiff": [],
    "udiff": [],
}
RECIPE = {"sparse": "sara", "lora_all_logits": "lora"}


def child(method: str, steps: int, batch: int, model: str, precision: str) -> dict:
    import torch

    from selectune.commands import RunSpec, build, probe_batches
    from selectune.config import compose
    from selectune.tasks import load_task
    from selectune.trainer import PRECISIONS, adamw, resolve_precision, task_loss

    torch.manual_seed(0)
    overrides = [f"recipe=causal/sst2_{RECIPE.get(method, method)}", f"model={model}",
                 f"task.max_train_examples={batch * (steps + 1)}", "task.max_eval_examples=1", *METHODS[method]]
    spec = RunSpec.from_config(compose("train", overrides))
    task = load_task(spec.task)
    backbone, method_obj = build(spec, task)
    train = task.encode("train", backbone)
    cpu = torch.device("cpu")
    method_obj.attach(backbone, probe_batches(task, train, backbone, batch, 0, cpu))
    method_obj.plan(1000, 100)
    model_ = backbone.model.train()
    optimizer = adamw(method_obj.param_groups(1e-4, 0.01), 1e-4, cpu)
    dtype = PRECISIONS[resolve_precision(precision, cpu)]
    times, tokens = [], 0
    for i in range(steps + 1):
        rows = list(range(i * batch, (i + 1) * batch))
        inputs = train.batch(rows)
        labels = inputs.pop("labels")
        keep = inputs.pop("logits_to_keep") if method == "lora_all_logits" else None
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits = model_(**inputs).logits
            loss = task_loss(logits if keep is None else logits[:, keep], labels, False)
        penalty = method_obj.penalty()
        (loss if penalty is None else loss + penalty).backward()
        optimizer.step()
        method_obj.after_step(i + 1)
        optimizer.zero_grad(set_to_none=True)
        if i >= 1:
            times.append(time.perf_counter() - t0)
            tokens += int(inputs["attention_mask"].sum())
    report = method_obj.report()
    return {"method": method, "step_s": statistics.median(times), "peak_mb": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024, "trainable": report.trainable, "stored": report.stored,
        "tokens_per_step": tokens / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--section", default="bench:step_llm", help="the docs section --write replaces")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.model, args.precision)))
        return
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for method in args.methods:
            out = subprocess.run([sys.executable, __file__, "--child", method, "--steps", str(args.steps),
                                  "--batch", str(args.batch), "--model", args.model, "--precision", args.precision],
                                 capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if out.returncode != 0:
                print(f"{method}: failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs.setdefault(method, []).append(r)
            print(f"round {round_ + 1} {method:15s} {r['step_s']:.2f} s/step, {r['peak_mb']:.0f} MiB peak RSS, "
                  f"trainable {r['trainable']:,}", flush=True)
    results = {m: {**rs[0], "step_s": statistics.median(r["step_s"] for r in rs), "all_s": [r["step_s"] for r in rs],
                   "peak_mb": max(r["peak_mb"] for r in rs)} for m, rs in runs.items()}
    lora = results.get("lora")
    lines = ["| method | trainable | stored | tokens/step | s/step (median; each round) | x LoRA time | peak RSS MiB "
             "| memory vs LoRA |", "|---|---|---|---|---|---|---|---|"]
    for method, r in results.items():
        rt = f"{r['step_s'] / lora['step_s']:.2f}" if lora else "n/a"
        rm = f"{100 * (r['peak_mb'] / lora['peak_mb'] - 1):+.1f}%" if lora else "n/a"
        lines.append(f"| {method} | {r['trainable']:,} | {r['stored']:,} | {r['tokens_per_step']:.0f} | "
                     f"{r['step_s']:.2f} ({', '.join(f'{t:.2f}' for t in r['all_s'])}) | {rt} | "
                     f"{r['peak_mb']:.0f} | {rm} |")
    import torch

    from selectune.trainer import resolve_precision

    command = "python scripts/bench/bench_step_llm.py " + " ".join(sys.argv[1:])
    body = (f"### Step time and memory per method on SmolLM2-135M\n\nGenerated {datetime.date.today()} by "
            f"`{command.strip()}` on {platform.machine()}, {os.cpu_count()} CPU cores (shared, busy), torch "
            f"{torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}: batch "
            f"{args.batch} SST-2 prompts, {resolve_precision(args.precision, torch.device('cpu'))}, one warm-up "
            f"step then the median of {args.steps} timed steps, {args.rounds} round(s) in turn (the median over "
            f"rounds); memory = the process's highest peak RSS (loading and set-up included).\n\n" + "\n".join(lines))
    publish(body, args.write, args.section)


if __name__ == "__main__":
    main()
