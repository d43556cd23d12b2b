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

That check, once short-schedule studies have run (same recipes and values, `trainer.epochs` lower):

    python scripts/analysis/schedule_ranking.py results/sweeps/vtab --short results/sweeps/vtab_5ep [--write ...]

compares each study under --short with the same-named study (and its extensions) under the root given: every
value's score on both schedules, each schedule's choice, what the short choice scores on the long schedule
against the long choice, and the rank correlation over the values both ran to the end. Section
`results:short_schedule`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import head_commit, publish


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


def by_value(folder: Path) -> tuple[str, dict[float, dict]]:
    """A study's grid key and its finished candidates over it and its extensions, by the key's value."""
    from selectune import sweep

    plan = sweep.parse([f"study={folder}"])
    if len(plan.grid) != 1:
        raise SystemExit(f"{folder}: a one-key grid is compared, this study's is {sorted(plan.grid) or 'empty'}")
    [key] = plan.grid
    found = sweep.candidates_with_extensions(plan, sweep.open_study(plan, create=False), quiet=True)
    return key, {float(c["values"][sweep.bare(key)]): c for c in found}


def compare_line(name: str, short: dict[float, dict], long: dict[float, dict]) -> tuple[str, bool | None]:
    """The Markdown row comparing one study on a short and a long schedule, and whether they chose the same
    value (None: one of them has no choice). Cells read `short / long` scores, `p` where the pruner stopped it,
    `·` where that schedule did not try the value."""
    from scipy.stats import spearmanr

    from selectune import sweep

    def shown(c: dict | None) -> str:
        if c is None or c["score"] is None:
            return "·"
        return f"{c['score']:.2f}" + ("p" if c["state"] == "pruned" else "")

    values = sorted(set(short) | set(long))
    cells = ", ".join(f"{v:.0e}: {shown(short.get(v))} / {shown(long.get(v))}" for v in values)
    pick_short, pick_long = sweep.choose(list(short.values())), sweep.choose(list(long.values()))
    if pick_short is None or pick_long is None:
        return f"| {name} | {cells} | — | — | — | — | — |", None
    v_short = next(v for v, c in short.items() if c is pick_short)
    v_long = next(v for v, c in long.items() if c is pick_long)
    on_long = long.get(v_short)
    if on_long is None or on_long["score"] is None:
        regret = "not run long"
    else:
        diff = on_long["score"] - pick_long["score"]
        regret = "0" if diff == 0 else f"{diff:+.2f}".replace("-", "−")
        regret += " (pruned)" if on_long["state"] == "pruned" else ""
    both = [v for v in values if v in short and v in long and short[v]["state"] == long[v]["state"] == "complete"]
    rho = spearmanr([short[v]["score"] for v in both], [long[v]["score"] for v in both])[0] if len(both) >= 3 else None
    rho_cell = "—" if rho is None or rho != rho else f"{rho:+.2f} ({len(both)})"
    steps = (sum(c["steps"] or 0 for c in short.values()), sum(c["steps"] or 0 for c in long.values()))
    return (f"| {name} | {cells} | {v_short:.0e} | {v_long:.0e} | {regret} | {rho_cell} | {steps[0]} / {steps[1]} |",
            v_short == v_long)


def short_schedule(long_root: Path, short_root: Path) -> str:
    """The `results:short_schedule` section: every study under short_root against its namesake under long_root."""
    from selectune import sweep

    lines, same, key = [], [], None
    for folder, plan in sweep.studies_in(short_root):
        if sweep.extended(plan) is not None:  # read with the study it extends
            continue
        if not (long_root / folder.name / "sweep.json").exists():
            raise SystemExit(f"{folder}: no study {long_root / folder.name} to compare it with")
        key, short = by_value(folder)
        long_key, long = by_value(long_root / folder.name)
        if long_key != key:
            raise SystemExit(f"{folder}: its grid is over {key}, {long_root / folder.name}'s over {long_key}")
        line, agree = compare_line(folder.name, short, long)
        lines.append(line)
        same.append(agree)
    if not lines:
        raise SystemExit(f"no study under {short_root}")
    head = [f"| study | {key}: val short / long | chosen short | chosen long | long score of the short choice − "
            "the long choice | Spearman ρ (values) | training steps short / long |", "|---|---|---|---|---|---|---|"]
    decided = [s for s in same if s is not None]
    return (f"Read at {head_commit()} by `python scripts/analysis/schedule_ranking.py {long_root} --short "
            f"{short_root}`. Short: the studies under {short_root} (the long schedule's recipes, values and "
            f"validation split, fewer epochs, every candidate run to its end); long: {long_root}'s studies with "
            "their extensions. Each value's best validation score on both (`p`: stopped by the pruner, its best "
            "until then; `·`: not tried); each schedule's choice by the sweep's own rule; what the short "
            "choice scored on the long schedule minus the long choice; ρ over the values both ran to the end "
            "(at least 3).\n\n" + "\n".join(head + lines) + "\n\n"
            f"The short schedule chose the long one's value in {sum(decided)} of {len(decided)} studies.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path)
    parser.add_argument("--short", type=Path, default=None,
                        help="a root of short-schedule studies to compare with the one root given")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    from selectune import sweep

    if args.short is not None:
        if len(args.roots) != 1:
            raise SystemExit("--short compares with one root of long-schedule studies")
        body = short_schedule(args.roots[0], args.short)
        publish(body, args.write, "results:short_schedule")
        return
    lines, stable_at = [], []
    for root in args.roots:
        for folder, plan in sweep.studies_in(root):
            if plan.recipe.endswith(("_sdiff", "_udiff", "_adalora")):  # scores before the budget holds (diff
                continue  # pruning's phase 1, AdaLoRA's warm-up) are of a larger delta than the one stored
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
            "measurement. Diff-pruning and AdaLoRA studies are left out: their scores before the budget holds "
            "(phase 1, before the projection; AdaLoRA's warm-up, before its final mask) are of a larger delta than "
            "the one stored.\n\n" + "\n".join(head + lines) + "\n\n"
            f"From 30% of the schedule on, the early choice stays the study's own (or a tie) in {early} of "
            f"{len(stable_at)} studies (from: {shares}).")
    publish(body, args.write, "results:schedule_ranking")


if __name__ == "__main__":
    main()
