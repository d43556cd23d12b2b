"""One phase-1 step's gradients under two checkouts, compared tensor by tensor (same seed, batch and noise).

    MKL_CBWR=COMPATIBLE python scripts/bench/phase1_grads.py --trees before=/path/to/old after=.
                                                              [--model minilm] [--batch 8] [--seq 64]

For U-Diff, S-Diff and S-Diff with 32-row groups under the paper's penalty: each checkout on PYTHONPATH in
its own process builds the recipe's method on the model, runs one forward (task loss + method.penalty())
and backward on the same random batch from the same seed, and saves every gradient; the script prints,
per variant, how many gradient tensors are bit-equal (and the first that are not), the largest difference
relative to the tensor's largest magnitude, and whether the task loss and the penalty are equal.
MKL_CBWR=COMPATIBLE keeps MKL's summation order the same in both processes (tests/test_flat_gates.py, the
resume test, says why).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "udiff": ["recipe=glue/sst2_udiff"],
    "sdiff": ["recipe=glue/sst2_sdiff"],
    "sdiff_rows32_paper": ["recipe=glue/sst2_sdiff", "method.group_rows=32", "method.group_penalty=paper"],
}


def child(out: str, model: str, batch: int, seq: int, overrides: list[str]) -> None:
    import torch

    from selectune.profiling import prepare

    bench = prepare([*overrides, f"model={model}"], seq, batch=batch, n_batches=1)
    torch.manual_seed(11)
    ids, labels = bench.batches[0]
    loss = torch.nn.functional.cross_entropy(bench.model(input_ids=ids).logits, labels)
    penalty = bench.method.penalty()
    (loss + penalty).backward()
    grads = {n: p.grad for n, p in bench.model.named_parameters() if p.grad is not None}
    torch.save({"grads": grads, "loss": loss.detach(), "penalty": penalty.detach()}, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs=2, required=True, metavar="LABEL=PATH")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[1], args.model, args.batch, args.seq, VARIANTS[args.child[0]])
        return
    import torch

    trees = [tuple(t.split("=", 1)) for t in args.trees]
    print("| variant | gradient tensors | bit-equal | max difference / tensor's max | loss equal | penalty "
          f"{trees[0][0]} | penalty {trees[1][0]} |\n|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            saved = []
            for label, path in trees:
                out = str(Path(tmp) / f"{variant}_{label}.pt")
                env = {**os.environ, "PYTHONPATH": str(Path(path).resolve())}
                subprocess.run([sys.executable, __file__, "--child", variant, out, "--model", args.model, "--batch",
                                str(args.batch), "--seq", str(args.seq), "--trees", *args.trees],
                               env=env, check=True, capture_output=True)
                saved.append(torch.load(out))
            a, b = saved
            if a["grads"].keys() != b["grads"].keys():
                sys.exit(f"{variant}: the two checkouts give gradients to different parameters")
            equal = sum(torch.equal(a["grads"][k], b["grads"][k]) for k in a["grads"])
            worst = max(float((a["grads"][k] - b["grads"][k]).abs().max() / a["grads"][k].abs().max().clamp_min(1e-30))
                        for k in a["grads"])
            differ = [k for k in a["grads"] if not torch.equal(a["grads"][k], b["grads"][k])]
            print(f"| {variant} | {len(a['grads'])} | {equal} | {worst:.1e} | {torch.equal(a['loss'], b['loss'])} | "
                  f"{a['penalty'].item():.7g} | {b['penalty'].item():.7g} |"
                  + (f" not bit-equal: {', '.join(differ[:4])}" if differ else ""), flush=True)


if __name__ == "__main__":
    main()
