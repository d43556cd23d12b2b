"""Selection sweep: per method × task, a small grid of learning rates and epoch counts, chosen on a
validation split carved from train (`task.validation`), never on GLUE dev.

    SELECTUNE_DATA=../shared/data OMP_NUM_THREADS=1 python scripts/reproduction/sweep.py --tasks cola mrpc stsb rte \\
        --methods lora bitfit linear --out runs/sweep --jobs 2 [--plan] [--write docs/results.md] [--write-recipes]

Each candidate is one `selectune train recipe=glue/<task>_<method> trainer.lr=<lr> trainer.epochs=<e>
task.validation=<v> trainer.select=best trainer.seed=<seed>` into `<out>/<task>_<method>/lr<lr>_ep<e>`:
`select=best` keeps the evaluation (one per epoch) with the best validation score, so a candidate's
score is its best epoch on `val`. The sweep is resumable: a candidate with results.json is read, one
with a checkpoint is resumed (`trainer.resume=true`), the rest are started, `--jobs` at a time.
`--plan` prints the candidates and an estimate of their cost (steps × `--step-seconds`) and runs nothing.
`--write-recipes` puts the winner's lr and epochs into recipes/glue/<task>_<method>.yaml with
`task.validation` and `select: best`, and a comment line listing every candidate's validation score; where
that name had no file (a recipe composed from preset/glue/<method> and the task), the file is made, on top of
the same preset.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# learning-rate grids per method: full FT around BERT's 2e-5, the PEFT methods one to two decades higher
LRS = {"full": [1e-5, 2e-5, 5e-5], "bitfit": [1e-4, 5e-4, 2e-3], "linear": [1e-3, 5e-3, 2e-2],
       "lora": [2e-4, 5e-4, 1e-3], "adalora": [5e-4, 1e-3, 2e-3], "spt_lora": [2e-4, 5e-4, 1e-3],
       "spt_adapter": [2e-4, 5e-4, 1e-3], "sara": [5e-4, 2e-3, 5e-3]}
EPOCHS = {"full": [3]}  # full FT: 3 epochs as in the papers; PEFT methods also get a longer schedule
PEFT_EPOCHS = [3, 10]


@dataclass(frozen=True)
class Candidate:
    task: str
    method: str
    lr: float
    epochs: int

    @property
    def folder(self) -> str:
        return f"{self.task}_{self.method}/lr{self.lr:g}_ep{self.epochs}"


def candidates(tasks: list[str], methods: list[str]) -> list[Candidate]:
    return [Candidate(t, m, lr, e) for t in tasks for m in methods for lr in LRS.get(m, LRS["lora"])
            for e in EPOCHS.get(m, PEFT_EPOCHS)]


def run(c: Candidate, args: argparse.Namespace) -> dict | None:
    """Train one candidate (or resume it); its results.json, or None if the run failed."""
    out = args.out / c.folder
    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    cmd = [sys.executable, "-m", "selectune", "train", f"recipe=glue/{c.task}_{c.method}", f"trainer.lr={c.lr}",
           f"trainer.epochs={c.epochs}", f"task.validation={args.validation}", "trainer.select=best",
           f"trainer.seed={args.seed}", "trainer.progress=false", f"out_dir={out}", *args.extra]
    if (out / "checkpoint").exists():
        cmd.append("trainer.resume=true")
    out.parent.mkdir(parents=True, exist_ok=True)
    with (args.out / f"{c.folder.replace('/', '__')}.log").open("w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        print(f"failed: {c.folder} (exit {done.returncode}; log in {args.out})", file=sys.stderr)
        return None
    return json.loads((out / "results.json").read_text())


def val_score(c: Candidate, results: dict) -> float | None:
    from selectune.tasks.glue import GLUE

    return results["metrics"]["val"][GLUE[c.task].primary]


def plan(cands: list[Candidate], args: argparse.Namespace) -> str:
    from selectune.tasks import TaskConfig, load_task

    sizes = {t: len(load_task(TaskConfig(name=t, validation=args.validation)).splits["train"])
             for t in {c.task for c in cands}}
    steps = {c: c.epochs * math.ceil(sizes[c.task] / 32) for c in cands}
    hours = sum(steps.values()) * args.step_seconds / 3600
    lines = [f"{len(cands)} candidates, {sum(steps.values()):,} training steps at batch 32, "
             f"≈{hours:.1f} CPU-hours at {args.step_seconds} s/step (≈{hours / args.jobs:.1f} h with "
             f"{args.jobs} at a time), evaluations not counted"]
    lines += [f"  {c.folder}: {steps[c]} steps" for c in cands]
    return "\n".join(lines)


def table(scores: dict[Candidate, float | None]) -> tuple[str, dict[tuple[str, str], Candidate]]:
    """The sweep table (one row per method × task, one cell per candidate) and each pair's winner."""
    winners: dict[tuple[str, str], Candidate] = {}
    rows = ["| task | method | candidates: lr / epochs → val score (best epoch) | chosen |", "|---|---|---|---|"]
    pairs = sorted({(c.task, c.method) for c in scores})
    for task, method in pairs:
        mine = [c for c in scores if (c.task, c.method) == (task, method)]
        done = [c for c in mine if scores[c] is not None]
        cells = ", ".join(f"{c.lr:g}/{c.epochs} → {'—' if scores[c] is None else f'{scores[c]:.2f}'}" for c in mine)
        if done:
            winners[(task, method)] = max(done, key=lambda c: (scores[c], -c.epochs, -c.lr))
        chosen = winners.get((task, method))
        rows.append(f"| {task} | {method} | {cells} | "
                    f"{'—' if chosen is None else f'lr {chosen.lr:g}, {chosen.epochs} epochs'} |")
    return "\n".join(rows), winners


def write_recipe(winner: Candidate, scores: dict[Candidate, float | None], validation: float) -> Path:
    """Set the winner's lr and epochs in the recipe, with the candidates' validation scores beside them."""
    path = REPO / "recipes" / "glue" / f"{winner.task}_{winner.method}.yaml"
    tried = ", ".join(f"{c.lr:g}/{c.epochs}ep {s:.2f}" for c, s in scores.items()
                      if (c.task, c.method) == (winner.task, winner.method) and s is not None)
    text = path.read_text() if path.exists() else on_its_preset(winner)
    head, sep, trainer = text.partition("\ntrainer:\n")
    if not sep:
        raise SystemExit(f"{path}: no top-level 'trainer:' block to write into")
    kept = [line for line in trainer.splitlines()
            if not re.match(r"\s+(lr|epochs|select):|\s+# chosen on val", line)]
    block = [f"  # chosen on val (task.validation={validation:g}, seed 42; lr/epochs → val): {tried}",
             f"  lr: {winner.lr:g}", f"  epochs: {winner.epochs}", "  select: best", *kept]
    body = head + sep + "\n".join(block) + "\n"
    if not re.search(r"(?m)^task:\n  validation:", body):
        body += f"task:\n  validation: {validation:g}  # best epoch chosen on this split, dev only reported\n"
    path.write_text(body)
    return path


def on_its_preset(winner: Candidate) -> str:
    """A recipe file for a name that had none: the preset and the task it was composed from, nothing else yet."""
    name = f"glue/{winner.task}_{winner.method}"
    return (f"# @package _global_\n# {name} — preset/glue/{winner.method} with lr and epochs chosen on validation\n"
            f"#   run:       selectune train recipe={name}\n"
            f"defaults:\n  - /preset/glue/{winner.method}\n  - override /task: glue/{winner.task}\n\ntrainer:\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["cola", "mrpc", "stsb", "rte"])
    parser.add_argument("--methods", nargs="+", default=["lora", "bitfit", "linear"])
    parser.add_argument("--validation", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--plan", action="store_true", help="print the candidates and their cost; run nothing")
    parser.add_argument("--step-seconds", type=float, default=1.3, help="for --plan: seconds per training step")
    parser.add_argument("--write", type=Path, default=None, help="put the sweep table into this Markdown file")
    parser.add_argument("--write-recipes", action="store_true")
    parser.add_argument("extra", nargs="*", help="more overrides for every candidate (key=value)")
    args = parser.parse_args()
    cands = candidates(args.tasks, args.methods)
    if args.plan:
        print(plan(cands, args))
        return
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(cands, pool.map(lambda c: run(c, args), cands), strict=True))
    scores = {c: None if r is None else val_score(c, r) for c, r in results.items()}
    body, winners = table(scores)
    body = ("### Selection sweep on the validation split\n\n"
            "`SELECTUNE_DATA=../shared/data python scripts/reproduction/sweep.py "
            + " ".join(sys.argv[1:]) + "`\n\n" + body)
    print(body)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
        from docsection import write_section

        write_section(args.write, "results:sweep", body)
    if args.write_recipes:
        for winner in winners.values():
            print(f"wrote {write_recipe(winner, scores, args.validation).relative_to(REPO)}")
    if any(s is None for s in scores.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
