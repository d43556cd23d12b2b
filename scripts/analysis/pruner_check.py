"""Did median pruning decide a sweep's choice? Read from the committed study journals: each study's winner, replayed
as if it had been the last candidate to run, against optuna's MedianPruner as `selectune sweep` sets it
(`n_warmup_steps=prune_after`: from that evaluation on, a candidate whose best score so far is below the median of
the finished candidates' scores at the same evaluation stops).

    python scripts/analysis/pruner_check.py results/sweeps/glue results/sweeps/vtab [--write docs/results.md]

Run last, a winner faces every other finished candidate, so this is the hardest order for it. "margin" is its
smallest lead (best so far − that median) over the evaluations where the pruner looks; negative: it would have been
stopped. What a pruned candidate would have reached is not in the journal, so this says whether pruning could have
removed the candidate that won among those that finished, not whether a pruned one would have won. Studies with
pruning off (the cached linear probe), under two finished candidates, or of diff pruning (its scores before the
projection are of the unprojected diff; its λ studies prune only after it) are left out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import head_commit, write_section


def smallest_lead(curve: dict[int, float], others: list[dict[int, float]],
                  prune_after: int) -> tuple[float, int] | None:
    """The winner's smallest lead over the median of `others` at the evaluations the pruner checks, and where."""
    leads = []
    best = float("-inf")
    for step in sorted(curve):
        best = max(best, curve[step])
        at = [o[step] for o in others if step in o]
        if step >= prune_after and at:
            leads.append((best - statistics.median(at), step))
    return min(leads) if leads else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", type=Path, nargs="+")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    from selectune import sweep

    rows, stopped = [], []
    for root in args.roots:
        for folder, plan in sweep.studies_in(root):
            if plan.pruner == "none" or plan.recipe.endswith(("_sdiff", "_udiff")):  # diff pruning: its scores
                continue  # before the projection are of the unprojected diff, not of what the run keeps
            study = sweep.open_study(plan, create=False)
            trials = study.get_trials(deepcopy=False)
            done = [t for t in trials if t.state.name == "COMPLETE" and "candidate" in t.user_attrs]
            pruned = [t for t in trials if t.state.name == "PRUNED"]
            best = sweep.winner(study)
            if best is None or len(done) < 2:
                continue
            won = next(t for t in done if t.user_attrs["candidate"] == best["candidate"])
            lead = smallest_lead(won.intermediate_values, [t.intermediate_values for t in done if t is not won],
                                 plan.prune_after)
            if lead is None:
                continue
            name = f"{root.name}/{folder.name}"
            stopped += [name] if lead[0] < 0 else []
            cut = ", ".join(f"{t.user_attrs.get('candidate')} at {max(t.intermediate_values)}" for t in pruned) or "—"
            rows.append(f"| {name} | {len(done)} | {cut} | {best['candidate']} | {lead[0]:+.2f} "
                        f"(evaluation {lead[1]}) |")
    lines = [f"Read at {head_commit()} by `python scripts/analysis/pruner_check.py "
             f"{' '.join(str(r) for r in args.roots)}` from the committed journals: {len(rows)} studies with median "
             f"pruning and two or more finished candidates; winners a median pruner would have stopped had they run "
             f"last: {len(stopped)}{': ' + ', '.join(stopped) if stopped else ''}.", "",
             "| study | finished | pruned (at evaluation) | chosen | its smallest lead over the median |",
             "|---|---|---|---|---|", *rows]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(args.write, "results:pruner_check", "### Did median pruning decide a choice? (the sweeps' "
                      "journals, each winner replayed as the last to run)\n\n" + text)


if __name__ == "__main__":
    main()
