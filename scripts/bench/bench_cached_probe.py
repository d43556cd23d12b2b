"""The linear probe cached vs uncached: wall time and dev scores of the same recipe, each in its own process.

    python scripts/bench/bench_cached_probe.py [--recipe glue/mrpc_linear] [--epochs 3] [--seed 42]
        [--rounds 1] [--write docs/benchmarks.md]

Each run is `selectune train <recipe> method.cached=<false|true>` with one thread (OMP_NUM_THREADS=1), timed
from process start to exit (model load and tokenisation included, the same for both); `train_time_s` is
the loop's own time (for the cached probe without the feature pass, which runs before the first step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import write_section


def run(recipe: str, cached: bool, epochs: float, seed: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "selectune", "train", f"recipe={recipe}", f"method.cached={str(cached).lower()}",
            f"trainer.epochs={epochs}", f"trainer.seed={seed}", "trainer.progress=false", f"out_dir={out}"]
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[2:])} failed:\n{proc.stderr[-2000:]}")
    results = json.loads((out / "results.json").read_text())
    return {"cached": cached, "wall_s": wall, "train_time_s": results["train_time_s"], "steps": results["steps"],
            "metrics": results["metrics"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="glue/mrpc_linear")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for cached in (False, True):
                row = run(args.recipe, cached, args.epochs, args.seed, Path(tmp) / f"{r}_{cached}")
                print(json.dumps(row), flush=True)
                rows.append(row)
    command = "python scripts/bench/bench_cached_probe.py" + "".join(
        f" --{k} {v}" for k, v in (("recipe", args.recipe), ("epochs", args.epochs), ("seed", args.seed),
                                   ("rounds", args.rounds)))
    lines = ["### Linear probe on cached features\n",
             f"Generated {date.today()} by `{command}` on {platform.machine()}, {os.cpu_count()} CPU cores "
             f"(shared with other jobs), torch {torch.__version__}, one thread per run. Each run is "
             f"`selectune train recipe={args.recipe} method.cached=<false|true> trainer.epochs={args.epochs} "
             f"trainer.seed={args.seed}` in its own process; wall = process start to exit (model load and "
             f"tokenisation included); loop = the trainer's `train_time_s` (the cached feature pass runs before it, "
             f"so it is in wall only). Scores are the run's own dev evaluation at the last step.\n",
             "| round | cached | steps | wall s | loop s | dev scores |", "|---|---|---|---|---|---|"]
    for i, row in enumerate(rows):
        scores = " · ".join(f"{split}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items())
                            for split, m in row["metrics"].items())
        lines.append(f"| {i // 2 + 1} | {'yes' if row['cached'] else 'no'} | {row['steps']} | {row['wall_s']:.1f} | "
                     f"{row['train_time_s']:.1f} | {scores} |")
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section(args.write, "bench:cached_probe", body)


if __name__ == "__main__":
    main()
