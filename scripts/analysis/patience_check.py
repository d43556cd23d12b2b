"""Would early stopping (`trainer.patience`) have cut the GLUE runs' cost without changing what they keep? Read
from the committed sweep journals: every finished candidate's per-epoch `val` curve, stopped after `p`
evaluations without a new best, against the whole schedule.

    python scripts/analysis/patience_check.py results/sweeps/glue [--write docs/results.md]

A candidate "keeps a worse epoch" when the best score before the stop is below its whole-schedule best (the
epoch `trainer.select=best` keeps); a study's choice changes when that happens to its winner. Linear-probe
studies are left out (cached features: seconds a candidate, nothing to save). A cut run is not a shorter
schedule, but with `select=best` a run stopped early is exactly the whole run up to its stop, so this is the
measurement, not an estimate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import head_commit, write_section

PATIENCES = (2, 3, 4)


def stop_after(scores: list[float], patience: int) -> int:
    """How many evaluations a run with this patience makes: it stops once `patience` in a row beat no best."""
    best, since = float("-inf"), 0
    for i, score in enumerate(scores, start=1):
        best, since = (score, 0) if score > best else (best, since + 1)
        if since >= patience:
            return i
    return len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    from selectune import sweep

    counts = {p: {"worse": 0, "winners": [], "saved": 0.0} for p in PATIENCES}
    total = 0
    for folder, plan in sweep.studies_in(args.root):
        if folder.name.split("_", 1)[1].startswith("linear"):
            continue
        study = sweep.open_study(plan, create=False)
        best = sweep.winner(study)
        for trial in study.get_trials(deepcopy=False):
            scores = [s for _, s in trial.user_attrs.get("evals") or []]
            if trial.state.name != "COMPLETE" or len(scores) < 2:
                continue
            total += 1
            for p in PATIENCES:
                stop = stop_after(scores, p)
                counts[p]["saved"] += 1 - stop / len(scores)
                if max(scores[:stop]) < max(scores):
                    counts[p]["worse"] += 1
                    if best is not None and trial.user_attrs.get("candidate") == best["candidate"]:
                        counts[p]["winners"].append(folder.name)
    lines = [f"Read at {head_commit()} by `python scripts/analysis/patience_check.py {args.root}`: {total} finished "
             f"candidates with a per-epoch curve (pruned ones left out).", "",
             "| patience (evaluations) | candidates keeping a worse epoch | studies whose winner changes | "
             "steps saved (mean) |", "|---|---|---|---|"]
    for p in PATIENCES:
        c = counts[p]
        named = ": " + ", ".join(c["winners"]) if c["winners"] else ""
        lines.append(f"| {p} | {c['worse']} of {total} | {len(c['winners'])}{named} | "
                     f"{100 * c['saved'] / max(total, 1):.0f}% |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(args.write, "results:patience_check", "### Early stopping on GLUE, checked on the sweeps' "
                      "curves\n\n" + text)


if __name__ == "__main__":
    main()
