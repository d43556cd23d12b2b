"""Every study below a folder as Markdown: each `selectune sweep` table (candidates, pruned ones and at which
evaluation, the chosen values) and the training steps and hours spent against the steps the grids hold.

    python scripts/reproduction/sweep_report.py [results/sweeps/glue] [--write docs/results.md]

Reads the committed journals only (study.journal + sweep.json); nothing is trained. A study still running
shows what it has finished. The section written is `results:sweeps:<folder name>`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import head_commit, publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path("results/sweeps/glue"))
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    from selectune import sweep

    parts, spent, most, done, pruned, candidates, seconds = [], 0, 0, 0, 0, 0, 0.0
    for folder, plan in sweep.studies_in(args.root):
        study = sweep.open_study(plan, create=False)
        rows = sweep.rows(study)
        per_candidate = {r["candidate"]: r for r in rows}
        planned = sweep.planned_steps(plan)
        spent += sum(r["steps"] or 0 for r in rows)
        seconds += sum(t.user_attrs.get("train_time_s") or 0.0 for t in study.get_trials(deepcopy=False)
                       if t.state.name in ("COMPLETE", "PRUNED"))
        most += sum(planned.values())
        done += sum(r["state"] == "complete" for r in rows)
        pruned += sum(r["state"] == "pruned" for r in rows)
        candidates += len(planned)
        left = [name for name in planned if name not in per_candidate]
        # a second study of one recipe (a grid extended upwards: `<task>_<method>_hi`) is named by its folder
        own = folder.name == plan.recipe.split("/", 1)[1]
        parts.append(f"#### {plan.recipe}{'' if own else f' (study {folder.name})'}\n\n" + sweep.table(plan, study)
                     + (f" (not finished: {', '.join(left)})" if left else ""))
    commit = head_commit()
    head = (f"Studies under `{args.root}` (read at {commit} by `python scripts/reproduction/sweep_report.py "
            f"{args.root}`): {len(parts)} studies, {candidates} candidates, {done} finished, {pruned} pruned, "
            f"{candidates - done - pruned} not finished; **{spent:,} training steps spent** of the {most:,} the "
            f"grids hold without pruning, in {seconds / 3600:.1f} hours of training (one thread each; set-up and "
            f"evaluation not counted).")
    body = head + "\n\n" + "\n\n".join(parts)
    publish(body, args.write, f"results:sweeps:{args.root.name}")


if __name__ == "__main__":
    from selectune.errors import SelectuneError

    try:
        main()
    except SelectuneError as err:  # e.g. SELECTUNE_DATA unset: the planned steps need each task's train size
        sys.exit(f"sweep_report: {err}")
