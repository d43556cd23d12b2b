"""Diff pruning's phase-1 step against full fine-tuning: dispatched ops, host-sync-prone ops, saved-for-backward
bytes, step time and peak RSS, one process per variant.

    python scripts/bench/phase1_ops.py [--model minilm] [--batch 8] [--seq 64] [--steps 4]

One step = forward, task loss + method.penalty(), backward, gradient clipping per family and AdamW with
foreach=True (what CUDA uses by default; the CPU default would loop per tensor and hide the count).
"kernel-like" ops exclude views, detach and AdamW's reads of its step counters (host tensors: no kernel on
a GPU either). Sync-prone: ops that read a device value
on the host (bincount, nonzero, item / _local_scalar_dense, unique, boolean-mask indexing, masked_select,
repeat_interleave without output_size). The counted step is the third (the optimiser state exists).
Saved-for-backward: bytes of the distinct non-parameter tensors autograd keeps during that step's forward.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "full": ["recipe=glue/sst2_full"],
    "udiff": ["recipe=glue/sst2_udiff"],
    "sdiff": ["recipe=glue/sst2_sdiff"],
    "sdiff_paper": ["recipe=glue/sst2_sdiff", "method.group_penalty=paper"],
    "sdiff_rows32": ["recipe=glue/sst2_sdiff", "method.group_rows=32"],
}
SYNC_PRONE = {"bincount", "nonzero", "_local_scalar_dense", "item", "_unique", "_unique2", "unique_dim",
              "unique_consecutive", "masked_select"}


def op_counter():
    """A dispatch mode counting every op, the kernel-like ones, and the sync-prone ones by name."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.all = self.kernels = 0
            self.syncs: dict[str, int] = {}
            self.names: dict[str, int] = {}
            self.optimizer = False  # AdamW's step counters are host tensors: their .item() is no device sync

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__
            self.all += 1
            host_read = self.optimizer and name == "_local_scalar_dense"  # AdamW's CPU step counters
            if not func.is_view and name != "detach" and not host_read:
                self.kernels += 1
                self.names[name] = self.names.get(name, 0) + 1
            bool_index = name in ("index", "index_put", "index_put_") and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ())
                if t is not None)
            no_size = name == "repeat_interleave" and kwargs.get("output_size") is None
            if (name in SYNC_PRONE or bool_index or no_size) and not self.optimizer:
                self.syncs[name] = self.syncs.get(name, 0) + 1
            return func(*args, **kwargs)

    return Counter()


def child(variant: str, model: str, batch: int, seq: int, steps: int) -> dict:
    import torch

    from selectune.backbone import load_backbone
    from selectune.commands import RunSpec
    from selectune.config import compose
    from selectune.methods import build_method

    torch.manual_seed(0)
    spec = RunSpec.from_config(compose("train", [*VARIANTS[variant], f"model={model}"]))
    backbone = load_backbone(spec.model, 2, False, None, 0)
    budget = spec.budget.resolve(backbone.num_base_parameters, backbone.num_head_parameters)
    method = build_method(spec.method, budget)
    method.attach(backbone)
    method.plan(1000, 100)
    net = backbone.model.train()
    groups = method.param_groups(1e-4, 0.01)
    optimizer = torch.optim.AdamW(groups, foreach=True)
    families: dict[str, list] = {}
    for group in groups:
        families.setdefault(group.get("clip", "all"), []).extend(group["params"])
    params = {id(p) for p in net.parameters()}
    g = torch.Generator().manual_seed(1234)
    batches = [(torch.randint(1000, 29000, (batch, seq), generator=g), torch.randint(0, 2, (batch,), generator=g))
               for _ in range(steps + 4)]
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in params and t.device.type != "meta":
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def step(ids: torch.Tensor, labels: torch.Tensor, i: int, record: bool = False, counter=None) -> None:
        with torch.autograd.graph.saved_tensors_hooks(keep if record else (lambda t: t), lambda t: t):
            loss = torch.nn.functional.cross_entropy(net(input_ids=ids).logits, labels)
            penalty = method.penalty()
            total = loss if penalty is None else loss + penalty
        total.backward()
        for family in families.values():
            torch.nn.utils.clip_grad_norm_(family, 1.0, foreach=True)
        if counter is not None:
            counter.optimizer = True
        optimizer.step()
        if counter is not None:
            counter.optimizer = False
        method.after_step(i + 1)
        optimizer.zero_grad(set_to_none=True)

    for i in range(2):
        step(*batches[i], i)
    counter = op_counter()
    with counter:
        step(*batches[2], 2, counter=counter)
    step(*batches[3], 3, record=True)
    times = []
    for i in range(4, steps + 4):
        t0 = time.perf_counter()
        step(*batches[i], i)
        times.append(time.perf_counter() - t0)
    return {"variant": variant, "ops": counter.all, "kernel_ops": counter.kernels, "syncs": counter.syncs,
            "names": counter.names,
            "saved_mib": sum(saved.values()) / 2**20, "step_s": statistics.median(times),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after 4 untimed)")
    parser.add_argument("--names", action="store_true", help="also print the kernel-like ops by name")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.batch, args.seq, args.steps)))
        return
    rows = []
    for variant in args.variants:
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--model", args.model, "--batch",
                              str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    full = next((r for r in rows if r["variant"] == "full"), None)
    print("| variant | ops | kernel-like ops | x full | sync-prone ops | saved for backward MiB | s/step | "
          "peak RSS MiB | x full RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['kernel_ops'] / full['kernel_ops']:.2f}" if full else "n/a"
        rss = f"{r['peak_rss_mib'] / full['peak_rss_mib']:.2f}" if full else "n/a"
        syncs = ", ".join(f"{k} {v}" for k, v in r["syncs"].items()) or "0"
        print(f"| {r['variant']} | {r['ops']:,} | {r['kernel_ops']:,} | {ratio} | {syncs} | {r['saved_mib']:.0f} | "
              f"{r['step_s']:.3f} | {r['peak_rss_mib']:.0f} | {rss} |")
    if args.names:
        for r in rows:
            print(r["variant"], json.dumps(dict(sorted(r["names"].items(), key=lambda kv: -kv[1]))))


if __name__ == "__main__":
    main()
