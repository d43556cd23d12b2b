"""Would a shorter selection schedule have chosen the same value? Read from the sweeps' committed journals.

    python scripts/analysis/schedule_ranking.py results/sweeps/glue [results/sweeps/vtab ...] [--write docs/results.md]

Every `selectune sweep` candidate records its validation score at each evaluation (the journal's `evals`: one
per epoch for GLUE and VTAB). For each study and each evaluation k, this takes the choice the sweep would make
had every candidate stopped at evaluation k — the best score up to k, among the candidates that reached k (a
candidate the pruner stopped earlier is out, as it would be) — and compares it with the study's choice on its
whole schedule: the same value or not, and the early choice's whole-schedule best minus the study's choice's
(for an early choice the pruner stopped later, its best before it stopped).

What this is not: a run cut at epoch k of 10 is not a k-epoch run. Its learning rate has decayed over 10
epochs' schedule (at epoch k it is still (1 - k/10) of the peak), so agreement here is evidence for a shorter
schedule, not a measurement of it; the check that settles it is the short schedule run. Nothing is trained.
The section written is `results:schedule_ranking`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import head_commit, write_section


def curves(study) -> dict[str, dict]:
    """Candidate -> its per-evaluation scores (in order), state and whole-schedule best."""
    from optuna.trial import TrialState

    found = {}
    for trial in study.get_trials(deepcopy=False):
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED) or "candidate" not in trial.user_attrs:
            continue
        raw = trial.user_attrs.get("evals")
        scores = [s for _, s in raw] if raw else [v for _, v in sorted(trial.intermediate_values.items())]
        if scores:
            found[trial.user_attrs["candidate"]] = {"scores": scores, "state": trial.state.name.lower(),
                                                     "best": max(scores)}
    return found


def early_choice(found: dict[str, dict], k: int) -> str | None:
    """The candidate with the best score in its first k evaluations, among those that reached evaluation k
    (ties: the earlier best, as the sweep breaks them by fewer steps)."""
    alive = {name: c["scores"][:k] for name, c in found.items() if len(c["scores"]) >= k}
    if len(alive) < 2:
        return None
    return max(alive, key=lambda n: (max(alive[n]), -alive[n].index(max(alive[n]))))


FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def at_fraction(longest: int, fraction: float) -> int:
    """The evaluation at `fraction` of a schedule of `longest` evaluations (at least the first)."""
    return max(1, math.ceil(round(fraction * longest, 6)))


def study_line(name: str, found: dict[str, dict], chosen: str) -> tuple[str, float | None]:
    """The Markdown row (one cell per fraction of the schedule) and the earliest fraction from which every
    later early choice is the study's own or ties with it on the whole schedule."""
    longest = max(len(c["scores"]) for c in found.values())
    cells = []
    for fraction in FRACTIONS:
        pick = early_choice(found, at_fraction(longest, fraction))
        if pick is None:
            cells.append("—")
        else:
            diff = found[pick]["best"] - found[chosen]["best"]  # its whole-schedule score against the choice's
            shown = "tie" if diff == 0 else f"{diff:+.2f}".replace("-", "−")
            cells.append("=" if pick == chosen else f"{pick} ({shown})")
    stable = None
    for k in range(longest, 0, -1):  # a tie on the whole schedule loses nothing: it counts as the same
        if all(early_choice(found, j) is None or found[early_choice(found, j)]["best"] == found[chosen]["best"]
               for j in range(k, longest + 1)):
            stable = k / longest
        else:
            break
    return f"| {name} | {chosen} | {len(found)} | {longest} | " + " | ".join(cells) + " |", stable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    from selectune import sweep

    lines, stable_at = [], []
    for root in args.roots:
        for folder in sorted(p.parent for p in root.glob("*/sweep.json")):
            plan = sweep.parse([f"study={folder}"])
            if plan.recipe.endswith(("_sdiff", "_udiff")):  # their per-evaluation scores include phase 1's,
                continue                                     # a model not yet projected: not comparable
            study = sweep.open_study(plan, create=False)
            best = sweep.winner(study)
            found = curves(study)
            if best is None or len(found) < 2:
                continue
            line, stable = study_line(f"{root.name}/{folder.name}", found, best["candidate"])
            lines.append(line)
            stable_at.append((f"{root.name}/{folder.name}", stable))
    if not lines:
        raise SystemExit("no study with two candidates and a choice under " + ", ".join(map(str, args.roots)))
    head = ["| study | chosen (whole schedule) | candidates | evaluations | "
            + " | ".join(f"{round(100 * f)}%" for f in FRACTIONS) + " |", "|---|---|---|---|" + "---|" * len(FRACTIONS)]
    commit = head_commit()
    early = sum(1 for _, s in stable_at if s is not None and s <= 0.3)
    shares = ", ".join(f"{name} {round(100 * s)}%" if s is not None else f"{name} never" for name, s in stable_at)
    body = (f"Read at {commit} by `python scripts/analysis/schedule_ranking.py "
            f"{' '.join(map(str, args.roots))}` from the committed journals. Each cell: the choice had every "
            "candidate stopped at that share of the schedule (evaluations: per epoch for GLUE and VTAB, every "
            "`trainer.eval_every` steps where the study fixed it); `=` where it is the study's own, else the value "
            "and its whole-schedule score minus the choice's (`tie`: equal); `—`: one candidate left. A cut run is "
            "not a shorter schedule (its learning rate decays over the whole one), so this is evidence, not the "
            "measurement. Diff-pruning studies are left out: their per-evaluation scores include phase 1's, before "
            "the projection.\n\n" + "\n".join(head + lines) + "\n\n"
            f"From 30% of the schedule on, the early choice stays the study's own (or a tie) in {early} of "
            f"{len(stable_at)} studies (from: {shares}).")
    print(body)
    if args.write:
        write_section(args.write, "results:schedule_ranking", body)


if __name__ == "__main__":
    main()
