"""A finished sweep's chosen candidate as its written recipe's seed-42 run of the 3-seed table.

    python scripts/reproduction/adopt_winners.py <clone>/results/sweeps/glue runs/reproduce [--dry-run]

Why: a GLUE study trains its candidates at seed 42 with exactly what `write=true` puts into the recipe (the lr,
10 epochs, 90% of train, the best epoch on `val`), leaving only dev unscored (`task.score_dev=false`). So the
chosen candidate *is* `selectune train recipe=glue/<task>_<method> trainer.seed=42`, but for a dev score that
never steers training: scoring dev on its stored delta gives that run's numbers, and the table's seed-42 run
costs one dev pass instead of a whole training run (a third of the table's CPU).

The choice is made over the study and the studies beside it that extend its grid (`<study>_hi`, `_lo`, as
`selectune sweep write=true` makes it); an extension itself is skipped (its base covers it).
Checked before a candidate is adopted, else it is skipped with the reason:
  - the study has a chosen candidate whose run folder (with its delta) is still here (runs/ is not committed:
    this runs on the machine that trained the study);
  - the recipe composed today, at seed 42, equals the candidate's config.yaml in every setting but bookkeeping
    (out_dir, run_name, progress, resume) and task.score_dev: a recipe changed since the sweep is not adopted;
  - its evaluations ran in fp32 (code since 091d13c; results.json naming its `primary` metric marks it): before,
    a bf16 run was scored under the autocast, and its chosen epoch may differ from the recipe's today (seen:
    RTE LoRA's val differed by one or two of 249 examples at some epochs, at equal weights);
  - the method is not the cached linear probe (its batches changed with trainer.group_by_length since; it
    trains in seconds anyway).
The adopted folder `<root>/<method>/<task>_s42` (reproduce_glue.sh's layout, so it skips that run) holds the
candidate's delta, metrics.jsonl and results.json with dev added (`selectune eval` on the delta, the whole
split, in the order a recipe run reports: dev, then val) and `adopted_from` naming the study and candidate;
its config.yaml is the candidate's with task.score_dev=true and out_dir the new folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

if TYPE_CHECKING:
    from selectune.sweep import SweepPlan

BOOKKEEPING = ("out_dir", "run_name", "trainer.progress", "trainer.resume", "task.score_dev", "task.data_root")


def adopt(folder: Path, plan: SweepPlan, root: Path, dry_run: bool) -> str:
    """Adopt one study's chosen candidate; a line saying what was done or why not."""
    from selectune import sweep
    from selectune.commands import evaluate_delta
    from selectune.config import compose
    from selectune.report import flat_settings  # a config as dotted key -> JSON value, as the report reads it
    from selectune.tasks.glue import GLUE

    base = sweep.extended(plan)
    if base is not None:
        return f"{plan.recipe}: {folder.name} extends {base.name}, whose choice covers both"
    best = sweep.choose(sweep.candidates_with_extensions(plan, sweep.open_study(plan, create=False), quiet=True))
    if best is None:
        return f"{plan.recipe}: no chosen candidate yet"
    task, _, method = plan.recipe.split("/", 1)[1].partition("_")
    if method == "linear":
        return f"{plan.recipe}: not adopted (the cached probe's batches changed since; its run takes seconds)"
    run = Path(best["run_dir"])
    if not (run / "results.json").exists() or not (run / "delta.safetensors").exists():
        return f"{plan.recipe}: the chosen run {run} is not here"
    results = json.loads((run / "results.json").read_text())
    if results.get("precision") != "fp32" and "primary" not in results:
        return (f"{plan.recipe}: not adopted, trained before evaluations left the bf16 autocast (091d13c): the "
                f"recipe today chooses its epoch on fp32 scores, which may pick another")
    recipe = flat_settings(OmegaConf.to_container(compose("train", [f"recipe={plan.recipe}", "trainer.seed=42"]),
                                                  resolve=True))
    trained = flat_settings(OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True))
    differ = sorted(k for k in set(recipe) | set(trained)
                    if not k.startswith(BOOKKEEPING) and recipe.get(k) != trained.get(k))
    if differ:
        return f"{plan.recipe}: not adopted, the recipe differs from the candidate in " + ", ".join(
            f"{k} ({trained.get(k)} -> {recipe.get(k)})" for k in differ[:4])
    out = root / method / f"{task}_s42"
    if (out / "results.json").exists():
        held = json.loads((out / "results.json").read_text()).get("adopted_from", {})
        chosen = (study_name(Path(best["study"])), best["candidate"])
        if held and (held.get("study"), held.get("candidate")) != chosen:
            return (f"{plan.recipe}: {out} holds another candidate ({held.get('study')} {held.get('candidate')}) "
                    f"than the choice ({chosen[0]} {chosen[1]}): remove it to adopt the choice")
        return f"{plan.recipe}: {out} already holds a finished run"
    if dry_run:
        return f"{plan.recipe}: would adopt {run} as {out}"
    staging = out.with_name(out.name + ".adopting")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ("delta.safetensors", "metrics.jsonl", "adalora_ranks.json"):  # the last: AdaLoRA's final ranks
        if (run / name).exists():
            shutil.copy2(run / name, staging / name)
    config = OmegaConf.load(run / "config.yaml")
    config.task.score_dev = True
    config.out_dir = str(out)
    OmegaConf.save(config, staging / "config.yaml")
    # the run's own eval batch size: the same batches its evaluations scored
    evaluated = evaluate_delta(str(staging), None, int(config.trainer.eval_batch_size), "cpu")
    scored = evaluated["metrics"]
    (staging / f"eval_{task}.json").unlink(missing_ok=True)  # its numbers go into results.json below
    results["metrics"] = {"dev": scored["dev"], "val": results["metrics"]["val"]}
    if "predictions" in evaluated:  # rows per predicted label, as a recipe run records them
        results["predictions"] = {split: evaluated["predictions"][split] for split in ("dev", "val")}
    primary = GLUE[task].primary
    # the delta is the run's: its val score equals the run's. To 1e-4 points, not exactly: the run scored its
    # unmerged form (LoRA's x·A·B beside x·W), the delta is merged into W, and a Pearson moves in the 6th digit
    # (STS-B LoRA: 88.099658 vs 88.099664); a class flip moves an accuracy or F1 by far more.
    if abs(scored["val"][primary] - results["metrics"]["val"][primary]) > 1e-4:
        shutil.rmtree(staging)
        return (f"{plan.recipe}: not adopted, its delta scores val {scored['val']} against the run's "
                f"{results['metrics']['val']}")
    results["adopted_from"] = {"study": study_name(Path(best["study"])), "candidate": best["candidate"],
                               "dev_scored_by": "selectune eval on the stored delta"}
    (staging / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    staging.rename(out)
    return f"{plan.recipe}: adopted {run} as {out} (dev {scored['dev']})"


def study_name(folder: Path) -> str:
    """A study as the repository names it: results/sweeps/<family>/<study>."""
    return f"results/sweeps/{folder.parent.name}/{folder.name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", type=Path)
    parser.add_argument("root", type=Path)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    from selectune import sweep

    for folder, plan in sweep.studies_in(args.studies):
        print(adopt(folder, plan, args.root, args.dry_run), flush=True)


if __name__ == "__main__":
    sys.exit(main())
