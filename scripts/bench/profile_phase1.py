"""Where a step of diff pruning's phase 1 goes, per op group, from the torch profiler; full fine-tuning beside it.

    python scripts/bench/profile_phase1.py [--variants full udiff sdiff] [--model minilm] [--batch 8] [--seq 64]
                                          [--steps 5] [--write docs/benchmarks.md --section bench:phase1_profile]

Each variant runs in its own process: the recipe's model (`--model`; a vision model gets random 3-channel
images of `--image` px instead of token ids), batch `--batch`, fixed random batches, the trainer's step
(forward, task loss + method.penalty(), backward, gradient clipping per `clip` family at 1.0, AdamW as
`selectune.trainer.adamw` builds it: fused), 3 untimed steps, then `--steps` steps under
torch.profiler (CPU). The groups are profiler ranges this script opens around the functions that do the
work (wrapped here, not in the library), in ms per step (inclusive CPU time of the range):
- forward / backward: the model's own, i.e. the whole forward (backward) less the groups below inside it;
- gates fwd: FlatGates.materialize (noise, gate, θ = θ0 + z ⊙ w; the penalty value when it is computed
  there is listed apart as "penalty fwd"); gates bwd: the flat Function's backward (penalty gradient apart
  as "penalty bwd" where it is a separate function);
- vocab fwd / bwd: the word embeddings' looked-up rows (`HardConcreteModule._looked_up`, and the
  backward of its row indexing: the dense w / α gradients of the table, autograd's IndexBackward0, since
  2026-12-06 `_RowGather`'s backward);
- penalty: method.penalty() (the λ-scaled term from the forward's value), clip, optimizer (AdamW over w and
  α: the vocabulary's w and α are half of them), zero_grad + after_step.
The timed columns are a separate run of `--steps` steps without the profiler (median wall and process CPU
time), for scale. The profiler's ranges are wall time on the step's thread: on a shared machine they include
waiting for a core, so compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import write_section

VARIANTS = {
    "full": ["recipe=glue/sst2_full"],
    "udiff": ["recipe=glue/sst2_udiff"],
    "sdiff": ["recipe=glue/sst2_sdiff"],
    "sdiff_rows32": ["recipe=glue/sst2_sdiff", "method.group_rows=32"],
}
VISION = {"full": "recipe=vtab/dtd10_full", "udiff": "recipe=vtab/dtd10_udiff", "sdiff": "recipe=vtab/dtd10_sdiff",
          "sdiff_rows32": "recipe=vtab/dtd10_sdiff"}
GROUPS = ["forward", "gates fwd", "penalty fwd", "vocab fwd", "backward", "gates bwd", "penalty bwd", "vocab bwd",
          "penalty", "clip", "optimizer", "other"]


def labelled(label: str, fn):
    import torch

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    return call


def instrument() -> None:
    """Open a profiler range around each function that does one group's work (those that exist in this tree)."""
    from selectune.delta import hardconcrete as hc

    targets = [(hc.FlatGates, "materialize", "gates fwd"), (hc.HardConcreteModule, "_looked_up", "vocab fwd")]
    if hasattr(hc.FlatGates, "penalty_forward"):  # p and dp/dα in the forward; the backward only scales dp
        targets.append((hc.FlatGates, "penalty_forward", "penalty fwd"))
    else:  # before 2026-12-06: Σp in the forward, p and dp recomputed in the backward
        targets += [(hc.FlatGates, "expected_l0", "penalty fwd"), (hc, "_penalty_terms", "penalty bwd")]
    for owner, name, label in targets:
        if hasattr(owner, name):
            setattr(owner, name, labelled(label, getattr(owner, name)))
    backward = hc._FlatGate.backward
    hc._FlatGate.backward = staticmethod(labelled("gates bwd", backward))


def child(variant: str, model: str, batch: int, seq: int, image: int, steps: int, extra: list[str]) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    instrument()
    from selectune.backbone import load_backbone
    from selectune.commands import RunSpec
    from selectune.config import compose
    from selectune.methods import build_method
    from selectune.trainer import adamw

    torch.manual_seed(0)
    vision = model.startswith("dinov2") or model.startswith("vit")
    overrides = [VISION[variant] if vision else VARIANTS[variant][0], *VARIANTS[variant][1:], f"model={model}",
                 *([f"model.image_size={image}"] if vision else []), *extra]
    spec = RunSpec.from_config(compose("train", overrides))
    backbone = load_backbone(spec.model, 2, False, None, 0)
    budget = spec.budget.resolve(backbone.num_base_parameters, backbone.num_head_parameters)
    method = build_method(spec.method, budget)
    method.attach(backbone)
    method.plan(10_000, 1_000)
    net = backbone.model.train()
    optimizer = adamw(method.param_groups(1e-4, 0.01), 1e-4, torch.device("cpu"))
    families: dict[str, list] = {}
    for group in optimizer.param_groups:
        families.setdefault(group.get("clip", "all"), []).extend(group["params"])
    g = torch.Generator().manual_seed(1234)
    if vision:
        inputs = [{"pixel_values": torch.randn(batch, 3, image, image, generator=g)} for _ in range(4)]
    else:
        vocab = int(getattr(net.config, "vocab_size", 30522))
        inputs = [{"input_ids": torch.randint(1000, vocab - 1, (batch, seq), generator=g)} for _ in range(4)]
    labels = [torch.randint(0, 2, (batch,), generator=g) for _ in range(4)]

    def step(i: int) -> None:
        with record_function("forward"):
            loss = torch.nn.functional.cross_entropy(net(**inputs[i % 4]).logits, labels[i % 4])
        with record_function("penalty"):
            penalty = method.penalty()
            total = loss if penalty is None else loss + penalty
        with record_function("backward"):
            total.backward()
        with record_function("clip"):
            for params in families.values():
                torch.nn.utils.clip_grad_norm_(params, 1.0)
        with record_function("optimizer"):
            optimizer.step()
        with record_function("other"):
            method.after_step(i + 1)
            optimizer.zero_grad(set_to_none=True)

    for i in range(3):
        step(i)
    times, cpu_times = [], []
    for i in range(3, 3 + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(i)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(3 + steps, 3 + 2 * steps):
            step(i)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key
        if name.startswith(("autograd::engine::evaluate_function: IndexBackward0",
                            "autograd::engine::evaluate_function: _RowGatherBackward")):
            name = "vocab bwd"
        if name in GROUPS:
            totals[name] = totals.get(name, 0.0) + event.cpu_time_total / 1000 / steps
    ms = {k: totals.get(k, 0.0) for k in GROUPS}
    ms["forward"] -= ms["gates fwd"] + ms["vocab fwd"]
    ms["gates fwd"] -= ms["penalty fwd"]
    ms["backward"] -= ms["gates bwd"] + ms["vocab bwd"]
    ms["gates bwd"] -= ms["penalty bwd"]
    return {"variant": variant, "ms": ms, "profiled_ms": sum(ms.values()), "step_s": statistics.median(times),
            "cpu_s": statistics.median(cpu_times),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": sum(p.numel() for p in method.trainable_parameters()) if hasattr(
                method, "trainable_parameters") else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["full", "udiff", "sdiff"])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--image", type=int, default=112, help="image side in px for a vision model")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--override", nargs="*", default=[], help="more config overrides for every variant")
    parser.add_argument("--title", default="", help="a line put above the table in --write")
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--section", default="bench:phase1_profile")
    parser.add_argument("--trees", nargs="+", default=[], metavar="LABEL=PATH",
                        help="profile these checkouts (each on PYTHONPATH in turn, e.g. before=/tmp/old after=.) "
                             "instead of this one; the rows are labelled")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.batch, args.seq, args.image, args.steps, args.override)))
        return
    trees = [tuple(t.split("=", 1)) for t in args.trees] or [("", None)]
    rows = []
    for variant in args.variants:
        for label, tree in trees:
            env = {**os.environ, **({"PYTHONPATH": str(Path(tree).resolve())} if tree else {})}
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--model", args.model, "--batch",
                                  str(args.batch), "--seq", str(args.seq), "--image", str(args.image), "--steps",
                                  str(args.steps), "--override", *args.override], capture_output=True, text=True,
                                 env=env)
            if out.returncode:
                sys.exit(f"{variant}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["variant"] = f"{variant} ({label})" if label else variant
            rows.append(row)
    shown = [g for g in GROUPS if any(r["ms"][g] >= 0.05 for r in rows)]
    lines = ["| variant | " + " | ".join(shown)
             + " | sum profiled | timed s/step (median) | CPU s/step | peak RSS MiB |",
             "|---|" + "---|" * (len(shown) + 4)]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(f"{r['ms'][g]:.1f}" for g in shown)
                     + f" | {r['profiled_ms']:.1f} | {r['step_s']:.3f} | {r['cpu_s']:.3f} | {r['peak_rss_mib']:.0f} |")
    shape = f"{args.batch} images of {args.image} px" if args.model.startswith(("dinov2", "vit")) else \
        f"{args.batch} x {args.seq} tokens"
    command = "python scripts/bench/profile_phase1.py " + " ".join(sys.argv[1:])
    body = (f"`{command.strip()}`: model `{args.model}`, batch {shape}, ms per step by op group over "
            f"{args.steps} profiled steps.\n\n" + "\n".join(lines))
    print(body)
    if args.write:
        write_section(args.write, args.section, (args.title + "\n\n" if args.title else "") + body)


if __name__ == "__main__":
    main()
