"""How task-specific is sensitivity? Probe two GLUE tasks with the offline MiniLM and compare.

    SELECTUNE_DATA=../shared/data python scripts/analysis/probe_overlap.py [--tasks sst2 rte] [--write docs/results.md]

Runs `selectune probe` (16 batches of 32, grad², budget 0.5% of the backbone) for each task, copies the
heat maps to docs/, and reports the overlap of the two tasks' global top-τ sets (|A ∩ B| / τ and the
Jaccard index) and the share of each heat-map column (and of the rest, outside the layers) in each set.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from selectune.probe import GRID_COLUMNS, share_grid
from selectune.selection import select_k
from selectune.sensitivity import layer_index

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import publish

DOCS = Path(__file__).resolve().parents[2] / "docs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs=2, default=["sst2", "rte"])
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    tops, shares, taus = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            out = Path(tmp) / task
            subprocess.run([sys.executable, "-m", "selectune", "probe", f"recipe=glue/{task}_spt_lora",
                            "probe.batches=16", "trainer.batch_size=32", f"out_dir={out}"], check=True)
            summary = json.loads((out / "summary.json").read_text())
            tau = int(next(iter(summary["budgets"].values())))
            scores = {k.rpartition("::")[0]: v for k, v in load_file(str(out / "sensitivity.safetensors")).items()
                      if k.endswith("::grad2")}
            tops[task] = {(n, int(i)) for n, idx in select_k(scores, tau, largest=True).items() for i in idx.tolist()}
            grid, outside = share_grid(summary["scores"]["grad2"], str(tau))
            shares[task] = [sum(col) for col in zip(*grid, strict=True)] + [outside]
            taus[task] = tau
            shutil.copy(out / "heatmap_grad2.png", DOCS / f"probe_{task}_grad2.png")
    a, b = args.tasks
    common = len(tops[a] & tops[b])
    jaccard = common / len(tops[a] | tops[b])
    inside = {task: {e for e in top if layer_index(e[0]) is not None} for task, top in tops.items()}
    inside_common = len(inside[a] & inside[b])
    columns = [*GRID_COLUMNS, "outside the layers"]
    rows = ["| task | τ | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for task in args.tasks:
        rows.append(f"| {task} | {taus[task]:,} | " + " | ".join(f"{100 * v:.1f}%" for v in shares[task]) + " |")
    body = (f"### Sensitivity maps: {a} vs {b}\n\n"
            "`SELECTUNE_DATA=../shared/data python scripts/analysis/probe_overlap.py "
            f"--tasks {a} {b}`: grad² over 16 training batches of 32 (fixed order, seed 42), offline MiniLM, "
            f"candidates = encoder matrices and vectors (no embeddings, no head), τ = 0.5% of the backbone.\n\n"
            f"Overlap of the two top-τ sets: {common:,} of {taus[a]:,} entries ({100 * common / taus[a]:.1f}%), "
            f"Jaccard {jaccard:.3f}. Inside the encoder layers (the pooler left out): {inside_common:,} of "
            f"{len(inside[a]):,} / {len(inside[b]):,} entries, "
            f"Jaccard {inside_common / len(inside[a] | inside[b]):.3f}."
            f"\n\nShare of each set per module type (matrix weights q … ffn-out; `vectors` = the "
            f"layers' biases and LayerNorms; outside the layers = the pooler):\n\n" + "\n".join(rows)
            + f"\n\n![{a}](probe_{a}_grad2.png) ![{b}](probe_{b}_grad2.png)")
    publish(body, args.write, "results:probe_overlap")


if __name__ == "__main__":
    main()
