"""The linear probe cached vs uncached: time and dev scores of the same recipe, each in its own process.

    python scripts/bench/bench_cached_probe.py [--recipe glue/mrpc_linear] [--epochs 3] [--seed 42]
        [--rounds 1] [--override key=value ...] [--write docs/benchmarks.md]

Each run is `selectune train <recipe> method.cached=<false|true>` with one thread (OMP_NUM_THREADS=1); both
runs of a round start together, so they share whatever else loads the machine. Each is timed from process
start to exit (model load and tokenisation included, the same for both), in wall-clock and in CPU seconds
(user + system, from wait4: what the run cost, whatever else shared the cores); `train_time_s` is the
loop's own wall time (for the cached probe without the feature pass, which runs before the first step).
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
from docsection import publish


def start(recipe: str, cached: bool, epochs: float, seed: int, out: Path,
          overrides: list[str]) -> tuple[subprocess.Popen, float, list]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "selectune", "train", f"recipe={recipe}", f"method.cached={str(cached).lower()}",
            f"trainer.epochs={epochs}", f"trainer.seed={seed}", "trainer.progress=false", f"out_dir={out}", *overrides]
    log = (out.parent / f"{out.name}.log").open("w")
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT), time.perf_counter(), args


def finish(proc: subprocess.Popen, t0: float, args: list, cached: bool, out: Path) -> dict:
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (out.parent / f"{out.name}.log").read_text()[-2000:]
        raise SystemExit(f"{' '.join(args[2:])} failed:\n{tail}")
    results = json.loads((out / "results.json").read_text())
    return {"cached": cached, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024, "train_time_s": results["train_time_s"],
            "steps": results["steps"], "metrics": results["metrics"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="glue/mrpc_linear")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--override", nargs="*", default=[], help="more key=value overrides for both runs")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            outs = {cached: Path(tmp) / f"{r}_{cached}" for cached in (False, True)}
            procs = {cached: start(args.recipe, cached, args.epochs, args.seed, out, args.override)
                     for cached, out in outs.items()}
            for cached in (True, False):  # the cached run ends first
                row = finish(*procs[cached], cached, outs[cached])
                print(json.dumps(row), flush=True)
                rows.append(row)
            rows[-2:] = rows[-2:][::-1]
    command = "python scripts/bench/bench_cached_probe.py" + "".join(
        f" --{k} {v}" for k, v in (("recipe", args.recipe), ("epochs", args.epochs), ("seed", args.seed),
                                   ("rounds", args.rounds))) + (
        f" --override {' '.join(args.override)}" if args.override else "")
    extra = "".join(" " + o for o in args.override)
    lines = ["### Linear probe on cached features\n",
             f"Generated {date.today()} by `{command}` on {platform.machine()}, {os.cpu_count()} CPU cores "
             f"(shared with other jobs: load average {os.getloadavg()[0]:.1f} at the end), torch {torch.__version__}, "
             f"one thread per run. Each run is `selectune train recipe={args.recipe} method.cached=<false|true> "
             f"trainer.epochs={args.epochs} trainer.seed={args.seed}{extra}` in its own process, both runs of a round "
             f"started together; wall and CPU (user + system) = process start to exit (model load and tokenisation "
             f"included); loop = the trainer's `train_time_s` (the cached feature pass runs before it, so it is in "
             f"wall and CPU only). Scores are each run's own evaluation at its last step.\n",
             "| round | cached | steps | wall s | CPU s | loop s | peak RSS MiB | scores |",
             "|---|---|---|---|---|---|---|---|"]
    for i, row in enumerate(rows):
        scores = " · ".join(f"{split}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items())
                            for split, m in row["metrics"].items())
        lines.append(f"| {i // 2 + 1} | {'yes' if row['cached'] else 'no'} | {row['steps']} | {row['wall_s']:.1f} | "
                     f"{row['cpu_s']:.1f} | {row['train_time_s']:.1f} | {row['peak_rss_mib']:.0f} | {scores} |")
    body = "\n".join(lines)
    publish(body, args.write, "bench:cached_probe")


if __name__ == "__main__":
    main()
