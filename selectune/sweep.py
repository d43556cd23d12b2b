"""`selectune sweep`: choose a recipe's hyperparameters on the validation split carved from train.

    selectune sweep glue/rte_lora                                # the method's default lr grid
    selectune sweep glue/rte_lora trainer.lr=2e-4,5e-4,1e-3 trainer.epochs=10 study=sweeps/rte_lora
    selectune sweep glue/rte_lora study=sweeps/rte_lora write=true   # the winner into recipes/glue/rte_lora.yaml
    selectune sweep study=sweeps/rte_lora table=true                 # the study so far, nothing run
    selectune sweep study=sweeps/rte_lora extend=2 write=true        # up to 2 values beyond an end of the grid

The search is a grid over the overrides given as comma lists (`trainer.lr=a,b,c`, `method.l0_weight=x,y`);
every other override applies to each candidate. A text or causal-LM candidate trains with `task.validation`
(10% of train, stratified, fixed seed), `trainer.select=best` and dev not scored at all: its score is its best
evaluation on the carved split, and nothing in the sweep ever sees dev. An image candidate (VTAB-1k) trains
on train800 and is scored on val200 (`task.protocol=select`): the test split is never read. For text, one long
schedule evaluated every epoch stands for every shorter one (select=best keeps the best epoch); image and
decoder recipes keep their own schedule. A candidate whose best score so far is below the median of the
earlier candidates' at the same evaluation stops there (`pruner=median`, from the evaluation `prune_after`
on; `pruner=none` runs every candidate to its end). A winner at an end of a numeric grid is named in the table,
with the sweep of one value beyond it in a study of its own (Optuna fixes a parameter's choices per study);
`write=true` then chooses over the study and those extensions together (and refuses while one has a candidate
not finished); `extend=N` first finishes an extension left unfinished, then runs new ones itself, one at a
time while the choice sits at an end, N at most. `select_only=trainer.epochs` (any fixed override, comma-separated)
keeps a setting out of what `write=true` writes: a choice made on a shorter schedule than the recipe trains (the
recipe's comment line says at which). The recipe written is the shipped one under recipes/, or, with
`hydra.searchpath=[file://<folder>]` among the overrides (a recipe of your own, or a `selectune cp` copy), the file
`<folder>/recipe/<name>.yaml`.

The study lives in one folder: `study.journal` (Optuna's journal file: every candidate, each evaluation's
score, what was pruned where) and `runs/<candidate>/` (the runs themselves). The journal is small and can be
committed: a killed sweep started again, in this clone or a fresh one, skips every finished or pruned
candidate, resumes a killed one from its checkpoint where its run folder is still there, and starts the
rest. Two sweeps may share a study (one per core): each takes candidates the other has not claimed.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import re
import shlex
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from selectune.errors import SelectuneError

# Default grids: full FT around BERT's 2e-5, the PEFT methods one to two decades higher (the references' values
# sit inside each); one long schedule, evaluated each epoch, per candidate.
DEFAULT_LRS: dict[str, list[float]] = {
    "full": [1e-5, 2e-5, 5e-5], "bitfit": [1e-4, 5e-4, 2e-3], "linear": [1e-3, 5e-3, 2e-2],
    "lora": [2e-4, 5e-4, 1e-3], "ia3": [3e-3, 1e-2, 3e-2], "adalora": [5e-4, 1e-3, 2e-3],
    "spt_lora": [2e-4, 5e-4, 1e-3], "spt_adapter": [2e-4, 5e-4, 1e-3], "sara": [5e-4, 2e-3, 5e-3]}
DEFAULT_EPOCHS = {"full": 5}  # others: 10
OPTIONS = ("study", "pruner", "prune_after", "write", "table", "validation", "plan", "extend", "select_only")
SET_BY_SWEEP = ("hydra", "out_dir", "task.validation", "task.score_dev", "task.protocol", "trainer.select",
                "trainer.resume")
JOURNAL = "study.journal"
WRITTEN_TASK_KEYS = ("task.max_train_examples",)  # fixed task overrides `write=true` keeps: part of the protocol


@dataclass
class SweepPlan:
    """What one `selectune sweep` call does: which recipe, the grid, what every candidate shares."""

    recipe: str
    grid: dict[str, list[str]]  # override key -> its values, as typed
    fixed: list[str]  # overrides applied to every candidate
    study: Path
    pruner: str = "median"
    prune_after: int = 2  # evaluations before any pruning
    extend: int = 0  # extension studies to run while the choice sits at an end of the values tried
    validation: float = 0.1
    write: bool = False
    table_only: bool = False
    plan_only: bool = False
    family: str = "glue"  # the recipe's task family: where a candidate is scored (see selection)
    defaults_used: list[str] = field(default_factory=list)
    select_only: tuple[str, ...] = ()  # fixed overrides the candidates trained with that write=true leaves out

    @property
    def selection(self) -> list[str]:
        """What makes a candidate choose on a split held out of training and never see the reported one."""
        if self.family == "vtab":
            return ["task.protocol=select"]  # train800 -> val200; test never read
        return [f"task.validation={self.validation:g}", "task.score_dev=false"]

    @property
    def split_name(self) -> str:
        return "val200" if self.family == "vtab" else f"validation {self.validation:g} of train"

    def points(self) -> list[dict[str, str]]:
        keys = list(self.grid)
        return [dict(zip(keys, values, strict=True)) for values in product(*(self.grid[k] for k in keys))]


def point_name(point: dict[str, str]) -> str:
    """A candidate's folder name: `trainer.lr=5e-4,trainer.epochs=10` -> `lr5e-4_epochs10`."""
    return "_".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in point.items()) or "default"


def studies_in(root: Path, nested: bool = False) -> Iterator[tuple[Path, SweepPlan]]:
    """Each study below `root` (a folder with `sweep.json` beside its journal: `<root>/<study>`, or at any depth
    with `nested`), in name order, with its plan as a sweep re-reads it: what the reports and analysis scripts walk."""
    for found in sorted(root.glob("**/sweep.json" if nested else "*/sweep.json")):
        yield found.parent, parse([f"study={found.parent}"])


def parse(args: list[str]) -> SweepPlan:
    """`selectune sweep` arguments: a recipe (positional or recipe=), sweep options, overrides."""
    options: dict[str, str] = {}
    overrides: list[str] = []
    recipe = None
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            if recipe is not None or arg.startswith("-"):
                raise SelectuneError(f"sweep: unexpected argument '{arg}' (give one recipe, then key=value ...)")
            recipe = arg
        elif key == "recipe":
            recipe = value
        elif key in OPTIONS:
            options[key] = value
        else:
            overrides.append(arg)
    study_text = options.get("study")
    given = set(options)  # what this call says, before a saved study's options fill in the rest
    if recipe is None and study_text and (Path(study_text) / "sweep.json").exists():
        saved = json.loads((Path(study_text) / "sweep.json").read_text())
        recipe, overrides = saved["recipe"], saved["overrides"] + overrides
        options = {**{k: str(v) for k, v in saved.get("options", {}).items()}, **options}
    if recipe is None:
        raise SelectuneError("which recipe? selectune sweep <recipe> [trainer.lr=a,b,c ...] [study=<dir>]")
    grid = {k: v.split(",") for k, _, v in (o.partition("=") for o in overrides) if "," in v and "[" not in v}
    fixed = [o for o in overrides if o.partition("=")[0] not in grid]
    for item in fixed:
        key = item.partition("=")[0].lstrip("+~")
        if key.startswith(SET_BY_SWEEP) and key != "hydra.searchpath":  # a user's own recipe folder: kept
            hint = " (the split's size: validation=<fraction or count>)" if key == "task.validation" else ""
            raise SelectuneError(f"sweep: the sweep sets {key} for every candidate{hint}")
    for key, values in grid.items():
        if key.lstrip("+~").startswith((*SET_BY_SWEEP, "trainer.seed")):
            raise SelectuneError(f"sweep: '{key}' cannot be searched (one seed; choices are made on one split)")
        if len(set(values)) != len(values) or any(v == "" for v in values):
            raise SelectuneError(f"sweep: {key}={','.join(values)} repeats or leaves out a value")
    plan = SweepPlan(recipe, grid, fixed, Path(study_text or f"sweeps/{recipe}"))
    plan.family = recipe_family(recipe, tuple(fixed))
    # the method a recipe name ends with, the longest match (`rte_spt_lora` is spt_lora, not lora)
    method = max((m for m in DEFAULT_LRS if recipe.endswith(f"_{m}")), key=len, default=recipe.rsplit("_", 1)[-1])
    if not any(k == "trainer.lr" for k in grid) and not any(o.startswith("trainer.lr=") for o in fixed):
        if method not in DEFAULT_LRS and not grid:
            raise SelectuneError(f"sweep: no default grid for '{recipe}'; give one, e.g. trainer.lr=1e-4,5e-4,1e-3")
        if method in DEFAULT_LRS:
            plan.grid = {"trainer.lr": [f"{lr:g}" for lr in DEFAULT_LRS[method]], **plan.grid}
            plan.defaults_used.append("trainer.lr")
    # GLUE-style text recipes train 3 epochs: a sweep gives them one long schedule to choose the epoch from;
    # image and causal-LM recipes keep their own (VTAB's 10 epochs, a decoder's few hundred steps)
    if plan.family in ("glue", "text") and "trainer.epochs" not in plan.grid \
            and not any(o.startswith("trainer.epochs=") or o.startswith("trainer.max_steps=") for o in fixed):
        plan.fixed.append(f"trainer.epochs={DEFAULT_EPOCHS.get(method, 10)}")
        plan.defaults_used.append("trainer.epochs")
    plan.pruner = options.get("pruner", plan.pruner)
    if plan.pruner not in ("median", "none"):
        raise SelectuneError(f"sweep: pruner={plan.pruner}: use median or none")
    for key in ("prune_after", "extend"):
        if key in options:
            if not options[key].isdigit():
                what = "evaluations" if key == "prune_after" else "extension studies"
                raise SelectuneError(f"sweep: {key}={options[key]}: give a number of {what}")
            setattr(plan, key, int(options[key]))
    if "validation" in options:
        try:
            plan.validation = float(options["validation"])
        except ValueError:
            raise SelectuneError(f"sweep: validation={options['validation']}: give a fraction or a count of train "
                                 "rows") from None
    if plan.family == "vtab" and "validation" in given:
        raise SelectuneError("sweep: validation= is for text tasks; an image task chooses on its own val200")
    if options.get("select_only"):
        plan.select_only = tuple(bare(k.strip()) for k in options["select_only"].split(",") if k.strip())
        unknown = [k for k in plan.select_only if k not in fixed_values(plan)]
        if unknown:
            raise SelectuneError(f"sweep: select_only={','.join(unknown)}: not a fixed override of this study "
                                 f"(fixed: {' '.join(plan.fixed) or 'none'})")
    plan.write = options.get("write", "false").lower() in ("true", "1", "yes")
    if plan.write:
        recipe_file(plan)  # a name the file could not take fails now, not after the candidates trained
    plan.table_only = options.get("table", "false").lower() in ("true", "1", "yes")
    plan.plan_only = options.get("plan", "false").lower() in ("true", "1", "yes")
    return plan


@functools.lru_cache(maxsize=64)
def recipe_family(recipe: str, fixed: tuple[str, ...]) -> str:
    """The task family the recipe (with the fixed overrides) trains on. Cached: reading a study and the studies
    beside it parses each several times, and one composition costs a fraction of a second."""
    from selectune.config import compose

    return str(compose("train", [f"recipe={recipe}", *map(added_or_set, fixed)]).task.family)


def added_or_set(override: str) -> str:
    """`+method.head_lr=x` (add a key the config lacks) as `++method.head_lr=x` (add it, or set it where it is):
    once `write=true` puts the winner's values into the recipe, the key is there, and a plain `+` would fail."""
    return "+" + override if override.startswith("+") and not override.startswith("++") else override


# --------------------------------------------------------------------------- the study store
def open_study(plan: SweepPlan, create: bool):
    """The Optuna study in `plan.study` (created on first use; the same grid and recipe on every later call)."""
    try:
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
    except ImportError:
        raise SelectuneError("selectune sweep needs Optuna: pip install 'selectune[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    journal = plan.study / JOURNAL
    if not create and not journal.exists():
        raise SelectuneError(f"no study in {plan.study} ({JOURNAL} not found)")
    plan.study.mkdir(parents=True, exist_ok=True)
    saved = plan.study / "sweep.json"
    mine = {"recipe": plan.recipe, "grid": plan.grid, "fixed": plan.fixed, "validation": plan.validation,
            "overrides": [*plan.fixed, *(f"{k}={','.join(v)}" for k, v in plan.grid.items())],
            "options": {"pruner": plan.pruner, "prune_after": plan.prune_after, "validation": plan.validation,
                        **({"select_only": ",".join(plan.select_only)} if plan.select_only else {})}}
    if saved.exists():
        before = json.loads(saved.read_text())
        if create and {k: before.get(k) for k in ("recipe", "grid", "fixed", "validation")} != \
                {k: mine[k] for k in ("recipe", "grid", "fixed", "validation")}:
            raise SelectuneError(f"{plan.study} holds a sweep of {before['recipe']} over "
                                 f"{' '.join(before['overrides'])}; give the same, or another study=")
    elif create:
        saved.write_text(json.dumps(mine, indent=1) + "\n")
    storage = JournalStorage(JournalFileBackend(str(journal)))
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=plan.prune_after)
              if plan.pruner == "median" else optuna.pruners.NopPruner())
    # load_study writes nothing; create_study logs a line even where the study exists, so a study that is
    # only read (table=true, a report, write=true after its last candidate) keeps its journal byte for byte
    if not create or "sweep" in {s.study_name for s in storage.get_all_studies()}:
        return optuna.load_study(study_name="sweep", storage=storage, pruner=pruner)
    return optuna.create_study(study_name="sweep", storage=storage, direction="maximize", pruner=pruner,
                               load_if_exists=True)


def held(folder: Path) -> bool:
    """Whether a live process owns a run folder (its flock, taken by every training run)."""
    if not folder.is_dir():
        return False
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we just took
    return False


def claims(study) -> dict[str, str]:
    """Candidate name -> its state: finished (COMPLETE, PRUNED) or running in a live process. A RUNNING
    trial whose run nobody holds was killed: it is marked failed and its candidate is free again."""
    from optuna.trial import TrialState

    states: dict[str, str] = {}
    for trial in study.get_trials(deepcopy=False):
        name = trial.user_attrs.get("candidate")
        if name is None:
            continue
        if trial.state == TrialState.RUNNING and not held(Path(trial.user_attrs["run_dir"])) \
                and trial.user_attrs.get("host") != socket.gethostname() + f":{os.getpid()}":
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            continue
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
            states[name] = trial.state.name
    return states


def planned(plan: SweepPlan) -> dict[str, tuple[int, int, str]]:
    """Candidate name -> (training steps if not pruned, steps per epoch, how often it is evaluated); the
    task's data is read to size the splits, nothing is trained."""
    from selectune.commands import RunSpec
    from selectune.config import compose
    from selectune.tasks import load_task

    out, sizes = {}, {}
    for point in plan.points():
        spec = RunSpec.from_config(compose("train", candidate_overrides(plan, point, plan.study / "runs" / "plan")))
        key = (spec.task.name, spec.task.validation)
        if key not in sizes:
            sizes[key] = len(load_task(spec.task).splits["train"])
        per_epoch, steps = spec.trainer.run_length(sizes[key])
        every = f"every {spec.trainer.eval_every} steps" if spec.trainer.eval_every else "each epoch"
        out[point_name(point)] = (steps, per_epoch, every)
    return out


def planned_steps(plan: SweepPlan) -> dict[str, int]:
    """Candidate name -> its training steps if it is not pruned."""
    return {name: steps for name, (steps, _, _) in planned(plan).items()}


def cost(plan: SweepPlan) -> str:
    """`plan=true`: the candidates and their training steps if none is pruned (the data is read, nothing trained)."""
    found = planned(plan)
    lines = [f"  {name}: {steps:,} steps ({per_epoch} per epoch, evaluated {every})"
             for name, (steps, per_epoch, every) in found.items()]
    total = sum(steps for steps, _, _ in found.values())
    return "\n".join([f"{plan.recipe}: {len(lines)} candidates, {total:,} training steps at most (pruning stops "
                      f"some early)", *lines])


# --------------------------------------------------------------------------- running
def run(plan: SweepPlan) -> None:
    """Train every candidate no process has finished or claimed, then print the table (and write the recipe)."""
    from selectune.commands import RunSpec
    from selectune.config import compose

    for point in plan.points():  # every value checked before anything is written or run
        RunSpec.from_config(compose("train", candidate_overrides(plan, point, plan.study / "runs" / "check")))
    study = open_study(plan, create=True)
    run_candidates(plan, study)
    if plan.extend:  # an extension begun before and left unfinished (a killed extend= call) is finished first
        for each in extensions(plan, quiet=True):
            run_candidates(each, open_study(each, create=False))
    for _ in range(plan.extend):  # while the choice sits at an end: one value beyond it, in its own study
        beyond = next_extension(plan, study)
        if beyond is None:
            break
        print(f"sweep: the choice sits at an end of the values tried; extending in {beyond.study}: "
              f"{' '.join(o for o in beyond.fixed if o not in plan.fixed)}", flush=True)
        run_candidates(beyond, open_study(beyond, create=True))
    print(table(plan, study))
    if plan.write:
        print(f"wrote {write_recipe(plan, study)}")


def run_candidates(plan: SweepPlan, study) -> None:
    """Train every candidate of the study that no process has finished or claimed."""
    for point in plan.points():
        if point_name(point) in claims(study):
            continue
        run_candidate(plan, study, point)


def candidate_overrides(plan: SweepPlan, point: dict[str, str], out: Path) -> list[str]:
    return [f"recipe={plan.recipe}", *map(added_or_set, plan.fixed), *(f"{k}={v}" for k, v in point.items()),
            *plan.selection, "trainer.select=best", "trainer.progress=false", f"out_dir={out}"]


def run_candidate(plan: SweepPlan, study, point: dict[str, str]) -> None:
    """One candidate as an Optuna trial: its score at every evaluation reported (the best so far), stopped
    when the pruner says so, its best validation score the trial's value."""
    import optuna
    from optuna.trial import TrialState

    from selectune.commands import train
    from selectune.config import compose

    name = point_name(point)
    out = plan.study / "runs" / name
    study.enqueue_trial({k: v for k, v in point.items()}, skip_if_exists=False)
    trial = study.ask({k: optuna.distributions.CategoricalDistribution(plan.grid[k]) for k in point})
    for key, value in (("candidate", name), ("run_dir", str(out)), ("host", f"{socket.gethostname()}:{os.getpid()}")):
        trial.set_user_attr(key, value)
    resume = (out / "checkpoint").exists()
    finished = out / "results.json"
    if out.is_dir() and not resume and not finished.exists() and not held(out):
        shutil.rmtree(out)  # killed before its first checkpoint: nothing to resume, so it starts again
    print(f"sweep {plan.recipe}: {name}" + (" (resumed)" if resume else "") + f" → {out}", flush=True)
    best = -math.inf
    evals = 0

    def on_eval(step: int, score: float) -> bool:
        nonlocal best, evals
        best, evals = max(best, score), evals + 1
        trial.report(best, evals)
        return trial.should_prune()

    try:
        if finished.exists():
            results = json.loads(finished.read_text())
        else:
            cfg = compose("train", [*candidate_overrides(plan, point, out), f"trainer.resume={str(resume).lower()}"])
            results = train(cfg, out, on_eval=on_eval)
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    for key in ("selected_step", "steps", "step_time_s", "train_time_s"):
        trial.set_user_attr(key, results[key])
    trial.set_user_attr("eval_time_s", results.get("eval_time_s"))  # absent from runs finished before it was kept
    trial.set_user_attr("evals", [[e["step"], score_of(e["metrics"], results)] for e in results["evals"]])
    value = score_of(results["metrics"], results)
    if results.get("stopped_at") is not None:
        trial.set_user_attr("stopped_at", results["stopped_at"])
        study.tell(trial, state=TrialState.PRUNED)
        print(f"  pruned at step {results['stopped_at']} (best val {value:.2f})", flush=True)
    else:
        study.tell(trial, value)
        print(f"  val {value:.2f} (best at step {results['selected_step']})", flush=True)


def score_of(metrics: dict[str, dict[str, float | None]], results: dict[str, Any]) -> float:
    """The primary metric on the split the run selected on (results.json names it; a run written before it
    did is a GLUE-style task whose spec gives it)."""
    primary = results.get("primary")
    if primary is None:
        from selectune.tasks import TaskConfig, task_spec

        primary = task_spec(TaskConfig(name=results["task"], family=results["family"])).primary
    value = metrics[results["selected_on"]][primary]
    return -math.inf if value is None else value


# --------------------------------------------------------------------------- reading a study
def rows(study) -> list[dict[str, Any]]:
    from optuna.trial import TrialState

    out = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED) or "candidate" not in trial.user_attrs:
            continue
        attrs = trial.user_attrs
        reports = trial.intermediate_values
        # the evaluations the run made (its results.json's, kept when it ended), not the ones its trial was told:
        # diff pruning's phase 1 and AdaLoRA before its final mask are not told, and a candidate resumed before
        # the trainer retold its earlier evaluations (0cc360f) told only those after the resume
        made = attrs.get("evals")
        out.append({"candidate": attrs["candidate"], "params": trial.params, "state": trial.state.name.lower(),
                    "score": trial.value if trial.value is not None else max(reports.values(), default=None),
                    "evals": len(made) if isinstance(made, list) else len(reports),
                    "steps": attrs.get("steps"), "selected_step": attrs.get("selected_step"),
                    "step_time_s": attrs.get("step_time_s")})
    return out


def winner(study) -> dict[str, Any] | None:
    """This study's best finished candidate (see choose)."""
    return choose(rows(study))


def table(plan: SweepPlan, study) -> str:
    """The study as Markdown: one line per candidate, the winner marked, the steps spent."""
    found = rows(study)
    keys = list(plan.grid)
    lines = [f"sweep of {plan.recipe} ({plan.study}); fixed: {' '.join(plan.fixed) or '—'}; "
             f"chosen on {plan.split_name}, pruner {plan.pruner} after {plan.prune_after} evaluations",
             "", "| " + " | ".join([*keys, "state", "val (best eval)", "evaluations", "steps", "s/step"]) + " |",
             "|" + "---|" * (len(keys) + 5)]
    base = extended(plan)
    # the mark: the choice over this study and the studies extending its grid (what write=true writes); in an
    # extension, its own best
    searched = with_extensions(plan, study, quiet=True) if base is None else []
    every = candidates(plan, searched)
    overall = choose(every)
    own = choose(found) if base is not None else overall if overall and overall["study"] == plan.study else None
    for row in sorted(found, key=lambda r: [str(r["params"].get(k)) for k in keys]):
        mark = " **chosen**" if own is not None and row["candidate"] == own.get("run_candidate", own["candidate"]) \
            else ""
        score = "—" if row["score"] is None else f"{row['score']:.2f}"
        lines.append("| " + " | ".join([*(str(row["params"].get(k)) for k in keys), row["state"] + mark, score,
                                         str(row["evals"]), f"{row['steps'] or 0:,}",
                                         f"{row['step_time_s'] or 0:.3g}"]) + " |")
    left = len(plan.points()) - len(found)
    spent = sum(r["steps"] or 0 for r in found)
    lines.append("")
    lines.append(f"{len(found)} of {len(plan.points())} candidates done ({sum(r['state'] == 'pruned' for r in found)}"
                 f" pruned), {spent:,} training steps" + (f"; {left} left" if left else ""))
    if base is not None:  # the study it extends reads both and says where to go next
        lines.append(f"(extends {base}: its table chooses over both)")
        return "\n".join(lines)
    if overall is not None and overall["study"] != plan.study:
        lines.append(f"chosen over this study and its extensions: {overall['candidate']} in {overall['study']} "
                     f"({overall['score']:.2f})")
    if overall is not None and not left and not extensions_left(searched):  # all in: is the choice at an end?
        taken: set[Path] = set()
        for key in keys:
            note = edge_note(plan, key, overall["values"], [c["values"][bare(key)] for c in every
                                                             if bare(key) in c["values"]], taken)
            lines += [note] if note else []
    return "\n".join(lines)


def edge_step(plan: SweepPlan, key: str, chosen: dict[str, str], tried: list[str],
              taken: set[Path]) -> tuple[list[str], Path, bool] | None:
    """Where to look next when the winner's `key` sits at an end of the numeric values tried (this study's grid
    and the studies that extend it): the overrides of one candidate a grid step further (the ratio of the last two
    values; integers stay integers), the other grid keys at the winner's values, in the next free
    `<study>_hi[N]` or `_lo[N]` (not one in `taken`, which it joins), and whether it is above. None where the value
    is inside, or the values are not all positive finite numbers."""
    try:
        values = sorted({float(v) for v in tried})
        value = float(chosen[bare(key)])
    except ValueError:
        return None
    if len(values) < 2 or not all(0 < v < math.inf for v in values) or values[0] < value < values[-1]:
        return None
    top = value == values[-1]
    beyond = value * (values[-1] / values[-2] if top else values[0] / values[1])  # one grid step further
    shown = str(round(beyond)) if all(v.is_integer() for v in values) else f"{beyond:.2g}"
    if float(shown) in values or float(shown) <= 0:
        return None  # an integer grid step rounded back onto a value tried, or down to zero
    stem, n = f"{plan.study}_{'hi' if top else 'lo'}", 1
    while (study := Path(stem + (str(n) if n > 1 else ""))).exists() or study in taken:
        n += 1
    taken.add(study)
    return [*(f"{k}={chosen[bare(k)]}" for k in plan.grid if k != key), f"{key}={shown}"], study, top


def edge_note(plan: SweepPlan, key: str, chosen: dict[str, str], tried: list[str], taken: set[Path]) -> str:
    """The table's line for edge_step: the winner's end and the sweep command to run next; "" where none."""
    step = edge_step(plan, key, chosen, tried, taken)
    if step is None:
        return ""
    overrides, study, top = step
    command = " ".join(["selectune sweep", *map(shlex.quote, [plan.recipe, *plan.fixed, *overrides,
                                                              *own_options(plan), f"study={study}"])])
    return (f"note: the chosen {key}={chosen[bare(key)]} is the {'top' if top else 'bottom'} of the values tried; "
            f"the best may lie {'above' if top else 'below'} it: {command}  (or extend=1)")


def own_options(plan: SweepPlan) -> list[str]:
    """The study's options that differ from the defaults, as typed: an extension must carve the same split (else
    it is not one search with the study) and should prune alike."""
    default = SweepPlan(plan.recipe, {}, [], plan.study)
    split = plan.family != "vtab" and plan.validation != default.validation  # vtab: its own val200
    return [f"validation={plan.validation:g}"] * split + [f"{k}={getattr(plan, k)}" for k in ("pruner", "prune_after")
                                                            if getattr(plan, k) != getattr(default, k)]


def next_extension(plan: SweepPlan, study) -> SweepPlan | None:
    """The extension study the table's note names (the first grid key at an end), as a plan to run; None where
    the choice is inside the values tried, or candidates are left."""
    searched = with_extensions(plan, study, quiet=True)
    every = candidates(plan, searched)
    overall = choose(every)
    if overall is None or len(searched[0][1]) < len(plan.points()) or extensions_left(searched):
        return None
    for key in plan.grid:
        step = edge_step(plan, key, overall["values"], [c["values"][bare(key)] for c in every
                                                         if bare(key) in c["values"]], set())
        if step is not None:
            overrides, path, _ = step
            split = [f"validation={plan.validation:g}"] if plan.family != "vtab" else []  # vtab: its own val200
            return parse([plan.recipe, *plan.fixed, *overrides, f"study={path}", f"pruner={plan.pruner}",
                          f"prune_after={plan.prune_after}", *split])
    return None


def recipe_file(plan: SweepPlan) -> Path:
    """Where `write=true` writes: with `hydra.searchpath=[file://<folder>, ...]` among the overrides (a user's own
    config folders), `<folder>/recipe/<name>.yaml` in the folder holding that recipe, else the first, so a sweep
    never writes into the installed package for a user; without, the shipped recipes/ (the project's)."""
    from selectune.config import conf_dir, searched_folders, shipped_file

    folders = searched_folders(plan.fixed)
    if not folders:
        return conf_dir() / "recipe" / f"{plan.recipe}.yaml"
    if shipped_file(plan.recipe):
        raise SelectuneError(f"sweep: write=true into {folders[0]}: {plan.recipe} is a shipped recipe's name, which "
                             f"is read before your folder; sweep a copy (selectune cp {plan.recipe} "
                             f"{folders[0]}/recipe/mine/{plan.recipe.rpartition('/')[2]}.yaml)")
    held = [folder for folder in folders if (folder / "recipe" / f"{plan.recipe}.yaml").is_file()]
    return (held or folders)[0] / "recipe" / f"{plan.recipe}.yaml"


def write_recipe(plan: SweepPlan, study) -> Path:
    """The winner's values, and the fixed overrides every candidate trained with, into the recipe file (made on
    top of its preset where the name had none), with a comment line of every candidate's score; GLUE dev stays
    unseen (the recipe selects on `val`)."""
    from selectune.recipes import composed

    base = extended(plan)
    if base is not None:  # an extension is one search with the study it extends: write from there
        print(f"sweep: {plan.study} extends {base}: the recipe is written from both")
        plan = parse([f"study={base}"])
        study = open_study(plan, create=False)
    searched = with_extensions(plan, study)
    left = extensions_left(searched)  # a value tried and not yet scored may be the winner: no choice without it
    if left:
        raise SelectuneError(f"{left[0]} extends {plan.study} and has candidates not finished: finish them "
                             f"first (selectune sweep study={left[0]}) or move that study away")
    found = candidates(plan, searched)
    best = choose(found)
    if best is None:
        raise SelectuneError(f"{plan.study}: no finished candidate to write")
    path = recipe_file(plan)
    if path.exists():
        text = path.read_text()
    else:
        made = composed().get(plan.recipe)
        if made is None:
            raise SelectuneError(f"recipe '{plan.recipe}' is neither a file nor composed from a preset")
        preset, task = made
        text = (f"# @package _global_\n# {plan.recipe} — preset/{preset} with values chosen on the validation "
                f"split\n#   run:       selectune train recipe={plan.recipe}\n"
                f"defaults:\n  - /preset/{preset}\n  - override /task: {task}\n")
    tried = ", ".join(f"{c['candidate']} {c['score']:.2f}" + (" (pruned)" if c["state"] == "pruned" else "")
                      for c in found if c["score"] is not None)
    # the schedule, the method's settings and the training subset every candidate saw go with the winner, so the
    # recipe trains as the candidate did; the backbone and other plumbing overrides stay the caller's
    # (`+method.head_lr=...` adds a setting the method's yaml leaves unset: in the recipe it is a plain key)
    # (but for `select_only`: a shorter selection schedule stays the sweep's, and the recipe says so)
    fixed = fixed_values(plan)
    chosen = {**{k: v for k, v in fixed.items() if k not in plan.select_only
                 and (k.startswith(("trainer.", "method.")) or k in WRITTEN_TASK_KEYS)},
              **{bare(k): best["values"][bare(k)] for k in plan.grid}}
    if plan.family != "vtab":  # text: the recipe keeps choosing its step on val; images: train800val200 -> test
        chosen.update({"trainer.select": "best", "task.validation": f"{plan.validation:g}"})
    else:  # evaluated per epoch to prune on val200; the final run scores the 10,000-image test set once
        chosen.pop("trainer.eval_every", None)
    text = re.sub(r"(?m)^  # chosen by selectune sweep.*\n", "", text).rstrip("\n") + "\n"
    studies = ", ".join(dict.fromkeys(str(c["study"]) for c in found))
    at = "".join(f" at {k}={fixed[k]}" for k in plan.select_only)
    note = f"chosen by selectune sweep on {'val200' if plan.family == 'vtab' else 'val'}{at} ({studies}): {tried}"
    # the note heads the section of the first value searched (a grid of one value: of the first value written)
    searched_key = bare(next(iter(plan.grid), next(iter(chosen), "")))
    for key, value in chosen.items():
        section, _, leaf = key.partition(".")
        if not leaf or "." in leaf:
            raise SelectuneError(f"sweep: cannot write '{key}' into a recipe (section.key only)")
        text = set_in_yaml(text, section, leaf, value, note if key == searched_key else None)
    path.parent.mkdir(parents=True, exist_ok=True)  # the first written recipe of its family (vtab/, causal/)
    path.write_text(text)
    return path


def bare(key: str) -> str:
    """An override's key without Hydra's add/delete prefix (`+method.head_lr` is method.head_lr)."""
    return key.lstrip("+~")


def fixed_values(plan: SweepPlan) -> dict[str, str]:
    """The fixed overrides as bare key -> value."""
    return {bare(k): v for k, _, v in (o.partition("=") for o in plan.fixed)}


def extensions(plan: SweepPlan, quiet: bool = False) -> list[SweepPlan]:
    """The studies beside this one that extend its grid (`<study>_hi`, `<study>_lo`, `<study>_hi2`, ..., as the
    table's edge note makes them): the same recipe, split and fixed overrides but for this study's grid keys, each
    of which it sets (in its grid or fixed). A study so named that differs is not one search with this one: it is
    named (unless `quiet`) and left out."""
    out = []
    keys = {bare(k) for k in plan.grid}
    mine = {k: v for k, v in fixed_values(plan).items() if k not in keys}
    for folder in sorted(plan.study.parent.glob(f"{plan.study.name}_*")):
        if not re.fullmatch(rf"{re.escape(plan.study.name)}_(hi|lo)\d*", folder.name) \
                or not (folder / JOURNAL).exists() or not (folder / "sweep.json").exists():
            continue
        other = parse([f"study={folder}"])
        theirs = fixed_values(other)
        sets = {bare(k) for k in other.grid} | set(theirs)
        if other.recipe != plan.recipe or {k: v for k, v in theirs.items() if k not in keys} != mine \
                or {bare(k) for k in other.grid} - keys or keys - sets or other.validation != plan.validation:
            if not quiet:
                print(f"sweep: {folder} is not an extension of {plan.study} (other recipe or settings): left out")
            continue
        out.append(other)
    return out


def extended(plan: SweepPlan) -> Path | None:
    """The study this one extends (`<base>_hi[N]` or `_lo[N]` beside it, and listed among its extensions), or
    None."""
    found = re.fullmatch(r"(.+)_(hi|lo)\d*", plan.study.name)
    base = plan.study.with_name(found.group(1)) if found else None
    if base is None or not (base / "sweep.json").exists() or not (base / JOURNAL).exists():
        return None
    return base if any(e.study == plan.study for e in extensions(parse([f"study={base}"]), quiet=True)) else None


def with_extensions(plan: SweepPlan, study, quiet: bool = False) -> list[tuple[SweepPlan, list[dict[str, Any]]]]:
    """This study and each study extending its grid, with their finished candidates (`rows`): each journal read
    once, for all a table, a write or an `extend=` step asks of them."""
    return [(plan, rows(study)), *((e, rows(open_study(e, create=False))) for e in extensions(plan, quiet))]


def extensions_left(searched: list[tuple[SweepPlan, list[dict[str, Any]]]]) -> list[Path]:
    """The extensions (`with_extensions` after the study itself) that still have candidates to finish (a value
    tried but not scored); empty where none has."""
    return [each.study for each, found in searched[1:] if len(found) < len(each.points())]


def candidates(plan: SweepPlan, searched: list[tuple[SweepPlan, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Every candidate of `with_extensions`' studies, each with the study it ran in, its run folder, its values
    (the fixed overrides with its grid point on top, bare keys) and its name by this study's grid keys
    (`run_candidate`: its own)."""
    found = []
    for each, done in searched:
        for row in done:
            values = {**fixed_values(each), **{bare(k): v for k, v in row["params"].items()}}
            name = point_name({k: values[bare(k)] for k in plan.grid if bare(k) in values})
            found.append({**row, "study": each.study, "values": values, "candidate": name,
                          "run_candidate": row["candidate"], "run_dir": each.study / "runs" / row["candidate"]})
    return found


def candidates_with_extensions(plan: SweepPlan, study, quiet: bool = False) -> list[dict[str, Any]]:
    """`candidates` of this study and its extensions (what write=true and adopt_winners.py choose from)."""
    return candidates(plan, with_extensions(plan, study, quiet))


def choose(found: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best finished candidate; ties: the fewer steps (a shorter schedule would have done), then the earlier
    in `found` (a study before its extensions)."""
    done = [c for c in found if c["state"] == "complete" and c["score"] is not None]
    return max(done, key=lambda c: (c["score"], -(c["selected_step"] or 0))) if done else None


def same_value(old: str, new: str) -> bool:
    """Whether two YAML scalars as typed say the same: numerically for numbers (`8` and `8.0`, `6.25e-8` and
    `6.25e-08`; YAML reads an exponent without a dot as text, so they are compared as typed), else as text."""
    try:
        return float(old) == float(new)
    except ValueError:
        return old.strip("'\"") == new.strip("'\"")


def set_in_yaml(text: str, section: str, key: str, value: str, comment: str | None = None) -> str:
    """`section: {key: value}` set in a recipe's text, its other lines and comments kept: the key's line is
    replaced where the section has it and holds another value (a line that already says it, `6.25e-8` for
    `6.25e-08` included, keeps its comment: the why of a value stays with it), else added to the section (made at
    the end where there is none)."""
    lines = text.splitlines()
    head = next((i for i, line in enumerate(lines) if line == f"{section}:"), None)
    if head is None:
        lines += ["", f"{section}:"]
        head = len(lines) - 1
    end = head + 1
    while end < len(lines) and (lines[end].startswith("  ") or not lines[end].strip()):
        end += 1
    while end > head + 1 and not lines[end - 1].strip():
        end -= 1
    found = next((i for i in range(head + 1, end) if re.match(rf"  {re.escape(key)}:", lines[i])), None)
    new = f"  {key}: {value}"
    if found is not None:
        if not same_value(lines[found].split(":", 1)[1].split(" #", 1)[0].strip(), value):
            lines[found] = new
    else:
        lines.insert(end, new)
    if comment is not None:
        lines.insert(head + 1, f"  # {comment}")
    return "\n".join(lines) + "\n"
