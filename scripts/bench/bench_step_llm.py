"""Step time and peak memory per method on the decoder LLM (SmolLM2-135M), on real prompt batches.

    SELECTUNE_DATA=../shared/data python scripts/bench/bench_step_llm.py [--methods lora sara ...]
        [--steps 2] [--batch 8] [--model smollm2_135m] [--write docs/results.md]

Each method runs in its own process (peak RSS is that method's alone): recipe `causal/sst2_<method>` (the
preset's method settings and budget), the first `batch x (steps + 1)` SST-2 training rows as prompts with
their answer (about 70 tokens a row with SmolLM2's chat frame), AdamW as the trainer builds it, one warm-up
step (the optimiser state), then `--steps` timed steps, each the trainer's forward -> answer-token loss +
penalty -> backward -> step -> after_step; the median is kept. `sparse` is SaRA on q_proj/v_proj at LoRA
r=8's count (460,800): the same trainable count as `lora`. CPU only here: wall time and peak RSS (which
includes loading and the method's set-up: SaRA's selection, SPT's probe). One round: the numbers carry the
noise of a shared machine.
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
from docsection import write_section

METHODS = {
    "full": [],
    "lora": [],
    "sparse": ["method.targets=[q_proj,v_proj]", "budget.fraction=null", "budget.count=460800"],
    "sara": [],
    "spt_lora": [],
    "adalora": [],
    "ia3": [],
    "sdiff": [],
    "udiff": [],
}
RECIPE = {"sparse": "sara"}


def child(method: str, steps: int, batch: int, model: str) -> dict:
    import torch

    from selectune.commands import RunSpec, build, probe_batches
    from selectune.config import compose
    from selectune.tasks import load_task
    from selectune.trainer import adamw, task_loss

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
    times, tokens = [], 0
    for i in range(steps + 1):
        rows = list(range(i * batch, (i + 1) * batch))
        inputs = train.batch(rows)
        labels = inputs.pop("labels")
        t0 = time.perf_counter()
        loss = task_loss(model_(**inputs).logits, labels, False)
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
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.model)))
        return
    results = {}
    for method in args.methods:
        out = subprocess.run([sys.executable, __file__, "--child", method, "--steps", str(args.steps), "--batch",
                              str(args.batch), "--model", args.model], capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode != 0:
            print(f"{method}: failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[method]
        print(f"{method:9s} {r['step_s']:.2f} s/step, {r['peak_mb']:.0f} MiB peak RSS, trainable {r['trainable']:,}",
              flush=True)
    lora = results.get("lora")
    lines = ["| method | trainable | stored | tokens/step | s/step | x LoRA time | peak RSS MiB | memory vs LoRA |",
             "|---|---|---|---|---|---|---|---|"]
    for method, r in results.items():
        rt = f"{r['step_s'] / lora['step_s']:.2f}" if lora else "n/a"
        rm = f"{100 * (r['peak_mb'] / lora['peak_mb'] - 1):+.1f}%" if lora else "n/a"
        lines.append(f"| {method} | {r['trainable']:,} | {r['stored']:,} | {r['tokens_per_step']:.0f} | "
                     f"{r['step_s']:.2f} | {rt} | {r['peak_mb']:.0f} | {rm} |")
    import torch

    command = "python scripts/bench/bench_step_llm.py " + " ".join(sys.argv[1:])
    body = (f"### Step time and memory per method on SmolLM2-135M\n\nGenerated {datetime.date.today()} by "
            f"`{command.strip()}` on {platform.machine()}, {os.cpu_count()} CPU cores (shared, busy), torch "
            f"{torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}: batch "
            f"{args.batch} SST-2 prompts, fp32, one warm-up step then the median of {args.steps} timed steps, one "
            f"round; memory = the process's peak RSS (loading and set-up included).\n\n" + "\n".join(lines))
    print(body)
    if args.write:
        write_section(args.write, "bench:step_llm", body)


if __name__ == "__main__":
    main()
