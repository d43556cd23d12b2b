"""What a table cost in CPU time: the trainer's own training and evaluation seconds, summed from the committed
study journals and run records (nothing is trained).

    python scripts/analysis/cpu_time.py results/sweeps/vtab results/dinov2_vtab_tuned [--match dtd10] \
        [--planned-hours 72] [--write docs/results.md --section cpu_time_vtab --title "..."]

Each folder is read for studies (`<study>/sweep.json` beside its `study.journal`: every finished or pruned
candidate) and for runs (`results.json` at any depth, outside a study; an adopted candidate is the study's, not
counted twice). Training is `train_time_s` (the steps);
evaluation is `eval_time_s`, which runs record since it was added to results.json: older runs are counted as
not recorded and their number is given. Process start, model loading, tokenising and a cached probe's feature
pass are in neither. Each run used one thread, so seconds are CPU-seconds of one core.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import head_commit, write_section


@dataclass
class Part:
    """One folder's total: how many candidates or runs, their steps and seconds."""

    name: str
    items: int = 0
    steps: int = 0
    train_s: float = 0.0
    eval_s: float = 0.0
    eval_missing: int = 0  # items with no eval_time_s

    def add(self, steps: int | None, train_s: float | None, eval_s: float | None) -> None:
        self.items += 1
        self.steps += steps or 0
        self.train_s += train_s or 0.0
        if eval_s is None:
            self.eval_missing += 1
        else:
            self.eval_s += eval_s


def study_parts(root: Path, match: str) -> list[Part]:
    """One Part per study folder below `root`, from its journal's finished and pruned candidates."""
    from selectune import sweep

    parts = []
    for folder, plan in sweep.studies_in(root, nested=True):
        if match not in folder.name:
            continue
        study = sweep.open_study(plan, create=False)
        part = Part(f"study {folder}")
        for trial in study.get_trials(deepcopy=False):
            if trial.state.name in ("COMPLETE", "PRUNED"):
                attrs = trial.user_attrs
                part.add(attrs.get("steps"), attrs.get("train_time_s"), attrs.get("eval_time_s"))
        if part.items:  # a study begun but with no candidate finished yet has cost nothing to count
            parts.append(part)
    return parts


def run_part(root: Path, match: str) -> Part | None:
    """The runs below `root` that are not a study's candidates, as one Part."""
    part = Part(f"runs {root}")
    for path in sorted(root.glob("**/results.json")):
        if match not in path.parent.name or any((p / "sweep.json").exists() for p in path.parents):
            continue
        results = json.loads(path.read_text())
        if "adopted_from" in results:  # a study's candidate kept as a table's run: its training is the study's
            continue
        part.add(results.get("steps"), results.get("train_time_s"), results.get("eval_time_s"))
    return part if part.items else None


def table(parts: list[Part], planned_hours: float | None) -> str:
    lines = ["| part | candidates or runs | steps | training (h) | evaluation (h) | evaluation not recorded |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {p.name} | {p.items} | {p.steps:,} | {p.train_s / 3600:.2f} | {p.eval_s / 3600:.2f} | "
              f"{p.eval_missing or ''} |" for p in parts]
    total = sum(p.train_s + p.eval_s for p in parts) / 3600
    missing = sum(p.eval_missing for p in parts)
    items = sum(p.items for p in parts)
    text = "\n".join(lines) + (f"\n\nTotal: **{total:.1f} CPU-hours** (one thread per run) over {items} candidates and "
                               f"runs, {sum(p.steps for p in parts):,} steps")
    if missing:
        text += f"; {missing} of them ran before evaluation time was recorded (their evaluations are not in it)"
    if planned_hours:
        text += f"; planned: {planned_hours:g} CPU-hours ({100 * total / planned_hours:.0f}% of it spent)"
    return text + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--match", default="", help="only studies and runs whose folder name contains this")
    parser.add_argument("--planned-hours", type=float, default=None)
    parser.add_argument("--write", type=Path, default=None, help="a Markdown file to put the table in")
    parser.add_argument("--section", default="cpu_time", help="its marker: <!-- results:<section> -->")
    parser.add_argument("--title", default="CPU time", help="the section's heading")
    args = parser.parse_args()
    parts: list[Part] = []
    for root in args.folders:
        if not root.is_dir():
            sys.exit(f"cpu_time: {root} is not a folder")
        parts += study_parts(root, args.match)
        part = run_part(root, args.match)
        parts += [part] if part else []
    if not parts:
        sys.exit(f"cpu_time: no study (sweep.json) or run (results.json) under {', '.join(map(str, args.folders))}")
    text = table(parts, args.planned_hours)
    print(text)
    if args.write:
        command = " ".join(["python scripts/analysis/cpu_time.py", *map(str, args.folders),
                            *([f"--match {args.match}"] if args.match else []),
                            *([f"--planned-hours {args.planned_hours:g}"] if args.planned_hours else [])])
        write_section(args.write, f"results:{args.section}",
                      f"### {args.title}\n\nRead at {head_commit()} by `{command}` from the committed journals and run "
                      f"records.\n\n{text}")


if __name__ == "__main__":
    from selectune.errors import SelectuneError

    try:
        main()
    except SelectuneError as err:
        sys.exit(f"cpu_time: {err}")
