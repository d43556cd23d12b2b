"""The fine-tuned decoder rows (issue 35): each `causal/<task>_<method>` sweep's chosen candidate, scored on
GLUE dev, beside the zero-shot model.

    python scripts/reproduction/causal_table.py [--studies results/sweeps/causal] [--keep results/causal_smollm2]
        [--write docs/results.md]

Per study: the candidate chosen on the carved validation split (`selectune sweep`), its run's results.json
(training rows, steps, s/step, peak memory, best step) and the `eval_<task>.json` that `selectune eval
run=<its run>` wrote (GLUE dev, never looked at during the sweep). Each row is kept as one small JSON under
`--keep` (committed; the runs themselves are not), and the table is built from those files, so it can be
rebuilt from a fresh clone. A study without a dev score yet is listed as left.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import head_commit, publish


def keep_rows(studies: Path, keep: Path) -> list[str]:
    """Write `keep/<study>.json` for every study whose chosen run has its dev score; the names left."""
    from selectune import sweep

    left = []
    for folder, plan in sweep.studies_in(studies):
        study = sweep.open_study(plan, create=False)
        best = sweep.winner(study)
        run = folder / "runs" / (best["candidate"] if best else "-")
        results = run / "results.json"
        evals = sorted(run.glob("eval_*.json"))
        if best is None or not results.exists() or not evals:
            if not (keep / f"{folder.name}.json").exists():  # kept earlier, from a clone that held its runs
                left.append(folder.name)
            continue
        r, e = json.loads(results.read_text()), json.loads(evals[0].read_text())
        row = {"study": folder.name, "recipe": plan.recipe, "grid": plan.grid, "fixed": plan.fixed,
               "candidates": {c["candidate"]: {"state": c["state"], "val": c["score"], "steps": c["steps"]}
                              for c in sweep.rows(study)},
               "chosen": best["params"], "val": best["score"], "selected_step": r["selected_step"],
               "steps": r["steps"], "step_time_s": r["step_time_s"], "peak_memory_mb": r["peak_memory_mb"],
               "precision": r["precision"], "budget": r.get("budget"), "dev": e["metrics"]["dev"],
               "dev_rows": e["examples"]["dev"], "dev_predictions": e.get("predictions", {}).get("dev"),
               "method": r.get("method"), "model": r.get("model")}
        keep.mkdir(parents=True, exist_ok=True)
        (keep / f"{folder.name}.json").write_text(json.dumps(row, indent=1) + "\n")
    return left


def table(keep: Path, left: list[str]) -> str:
    lines = ["| task | method | stored | lr chosen (val, candidates) | best step / steps | dev accuracy | "
             "dev rows predicted per label | s/step | peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(keep.glob("*.json")):
        r = json.loads(path.read_text())
        task, _, method = r["study"].partition("_")
        tried = ", ".join(f"{name} {c['val']:.1f}" + (" pruned" if c["state"] == "pruned" else "")
                          for name, c in sorted(r["candidates"].items()) if c["val"] is not None)
        stored = f"{r['budget']['stored']:,}" if r.get("budget") else "—"
        counts = r.get("dev_predictions")  # recorded by `selectune eval` since 4ed8945
        predicted = ", ".join(f"{label} {n}" for label, n in counts.items()) if counts else "not recorded"
        lines.append(f"| {task} | {method} | {stored} | {r['chosen'].get('trainer.lr')} ({tried}) | "
                     f"{r['selected_step']} / {r['steps']} | {r['dev']['accuracy']:.2f} ({r['dev_rows']} rows) | "
                     f"{predicted} | {r['step_time_s']:.2f} | {r['peak_memory_mb']:.0f} |")
    commit = head_commit()
    text = (f"Fine-tuned SmolLM2-135M-Instruct (read at {commit} by `python scripts/reproduction/causal_table.py`): "
            "each row is the candidate `selectune sweep` chose on 200 rows carved from the training file, then "
            "scored once on GLUE dev with `selectune eval`.\n\n" + "\n".join(lines))
    if left:
        text += f"\n\nNot finished yet: {', '.join(left)}."
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=Path, default=Path("results/sweeps/causal"))
    parser.add_argument("--keep", type=Path, default=Path("results/causal_smollm2"))
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    left = keep_rows(args.studies, args.keep) if args.studies.exists() else []
    body = table(args.keep, left)
    publish(body, args.write, "results:causal_finetuned")


if __name__ == "__main__":
    main()
