"""Diff pruning's two phases, per run: how dense phase 1 ends, what the projection costs, what phase 2 recovers.

    python scripts/analysis/diffpruning_phases.py results/glue_minilm_mrpc/{udiff,sdiff,sdiff_reference}/mrpc_s42 \\
        [--write docs/results.md]

Read from each run's metrics.jsonl and results.json (written by `selectune train`): the last logged
phase-1 statistics (eval-mask density, share of groups fully off), the dev metric of the last
evaluation before the projection, of the first one after it (the switch step: evaluated on the
projected model, before any phase-2 step), and at the end, plus the share of tensors left untouched
by the stored delta. The paper (BERT-large) ends phase 1 at 0.6-3.3% density and loses ~0.1 point to
the projection.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from selectune.report import metrics_file, metrics_lines

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import publish

PROJECTION = re.compile(r"projection: (\d+) nonzero -> (\d+) kept")


def row(run: Path) -> str:
    """One table row. A run cut before its end (no results.json) still has phase 1 and the projection
    in metrics.jsonl / train.log: its row says how far phase 2 got instead of the final metric."""
    path = metrics_file(run)
    records = [json.loads(line) for line in metrics_lines(path)] if path is not None else []
    config = OmegaConf.load(run / "config.yaml")
    finished = (run / "results.json").is_file()
    result = json.loads((run / "results.json").read_text()) if finished else None
    evals = [(r["step"], r["eval"]["dev"]) for r in records if "eval" in r]
    primary = next(iter(evals[0][1]))
    evals = [(step, dev[primary]) for step, dev in evals]
    stats = [r for r in records if "expected_density" in r]
    switch = max(r["step"] for r in stats) if stats else 0
    switch = min(step for step, _ in evals if step > switch)  # first evaluation after the last phase-1 log
    before = [m for step, m in evals if step < switch]
    after = dict(evals)[switch]
    method = config.method.name
    penalty = config.method.get("group_penalty", "paper (unset in its config: the only form then)")
    rows = config.method.get("group_rows")  # None: one group per tensor (the paper's)
    variant = f"group_penalty={penalty}{f', group_rows={rows}' if rows else ''}" if method == "sdiff" else ""
    if finished:
        state = result["method_state"]
        nonzero, kept = state["projected_from_nonzero"], state["kept"]
        end, untouched = f"{result['metrics']['dev'][primary]:.2f}", f"{100 * state['tensors_untouched_fraction']:.1f}%"
    else:
        nonzero, kept = map(int, PROJECTION.search((run / "train.log").read_text()).groups())
        last = max((r for r in records if "epoch" in r), key=lambda r: r["step"])
        end, untouched = f"cut at epoch {last['epoch']:.1f} of {config.trainer.epochs} (last: {evals[-1][1]:.2f})", "–"
    return (f"| {config.task.name} | {method}{f' ({variant})' if variant else ''} | {config.trainer.seed} | "
            f"{config.trainer.batch_size} | {config.method.l0_weight:.3g} | {primary} | "
            f"{100 * stats[-1]['z_nonzero_eval']:.2f}% | {100 * stats[-1]['groups_off_fraction']:.1f}% | "
            f"{nonzero:,} → {kept:,} | {before[-1]:.2f} | {after:.2f} | {end} | {untouched} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    lines = ["| task | method | seed | batch | λ | dev metric | phase-1 density at its last log (eval mask) | "
             "groups fully off then | "
             "nonzero → kept at the projection | dev before projection | dev just after | dev at the end | "
             "tensors untouched by the stored delta |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(run) for run in args.runs]
    body = ("### Diff pruning, phase by phase\n\n`python scripts/analysis/diffpruning_phases.py "
            + " ".join(str(r) for r in args.runs) + "`\n\n" + "\n".join(lines))
    publish(body, args.write, "results:diffpruning_phases")


if __name__ == "__main__":
    main()
