"""`selectune report <run dirs or a multirun dir> [out=<dir>] [pair=A:B ...]`: one table and the papers' plots.

Collects every results.json below the given folders, groups runs by (task, method, budget: the count a
run was asked to store, else the count it stored, and a variant label read from each run's config.yaml —
so `sdiff` with two penalty forms or two learning rates are two rows named by the difference, never one row
with a false ±), and averages over seeds (mean ± sample std), then writes to `out` (default: the first folder):
    report.md            task × method: primary dev metric, other metrics, seeds, stored params,
                         % of the backbone, delta bytes, s/step, peak memory; with two GLUE tasks or
                         more, also method × task (primary metric) and the average over the tasks; with
                         pair=A:B, A − B per task on the seeds both have (noise of seed choice removed)
    metric_vs_budget.png per task: primary metric against stored parameters (log scale), one line per method
    training_curves.png  training loss against step, one panel per task, one line per run

Run folders are read, not trusted: a results.json that cannot be read or lacks what the table needs,
an unreadable config.yaml, or a metrics.jsonl line that is not a JSON record is skipped with a
one-line warning on stderr ("selectune: warning: skipping ...") and the rest is reported.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from selectune import runfs
from selectune.budget import BudgetConfig
from selectune.errors import SelectuneError
from selectune.tasks.glue import GLUE

# Settings that differ between runs of one experiment without making them different experiments.
NOT_A_VARIANT = ("trainer.seed", "trainer.resume", "trainer.progress", "trainer.device", "trainer.eval_batch_size",
                 "trainer.log_every", "trainer.checkpoint_every", "trainer.checkpoint_minutes", "trainer.grad_accum",
                 "out_dir", "run_name", "task.data_root", "debug", "online",
                 # the split a run reports on (VTAB's select -> val200, final -> test): the table groups and
                 # labels rows by the split itself, so a final run of a recipe is that recipe's row, not a variant
                 "task.protocol")


def collect(folders: list[Path]) -> list[dict[str, Any]]:
    runs, skipped = [], 0
    for folder in folders:
        if not folder.exists():
            raise SelectuneError(f"report: {folder} does not exist")
        for path in sorted(folder.rglob("results.json")):
            try:
                runs.append(read_run(path))
            except SelectuneError as err:
                warn(f"skipping {path}: {err}")
                skipped += 1
    if not runs:
        raise SelectuneError(f"report: no results.json below {', '.join(map(str, folders))}"
                             + (" that can be read" if skipped else ""))
    return runs


def warn(message: str) -> None:
    """One line on stderr: what was left out of the report and why."""
    print(f"selectune: warning: {message}", file=sys.stderr)


# What the table reads from a results.json: key -> accepted types
RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "task": (str,), "method": (str,), "seed": (int,), "metrics": (dict,), "budget": (dict,),
    "delta_bytes": (int, float), "step_time_s": (int, float), "peak_memory_mb": (int, float)}


def read_run(path: Path) -> dict[str, Any]:
    """One run's results.json (checked for what the report reads) with its flattened config.yaml."""
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SelectuneError(f"not readable JSON ({type(err).__name__}: {str(err)[:120]})") from None
    if not isinstance(result, dict):
        raise SelectuneError(f"holds a JSON {type(result).__name__}, not an object")
    for key, kinds in RESULT_FIELDS.items():
        if not isinstance(result.get(key), kinds) or isinstance(result.get(key), bool):
            raise SelectuneError(f"'{key}' is {'missing' if key not in result else repr(result[key])[:60]}")
    metrics = result["metrics"]
    if not metrics or not all(isinstance(v, dict) and v for v in metrics.values()):
        raise SelectuneError("'metrics' holds no split with metrics")
    split = next(iter(metrics))
    if any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in metrics[split].values()):
        raise SelectuneError(f"'metrics.{split}' holds a value that is not a number")
    if result["task"] in GLUE and GLUE[result["task"]].primary not in metrics[split]:
        raise SelectuneError(f"'metrics.{split}' lacks {result['task']}'s {GLUE[result['task']].primary}")
    budget = result["budget"]
    for key in ("stored", "backbone"):
        if not isinstance(budget.get(key), int) or budget[key] < 0 or (key == "backbone" and not budget[key]):
            raise SelectuneError(f"'budget.{key}' is {budget.get(key)!r}")
    result["run_dir"] = str(path.parent)
    config = path.parent / "config.yaml"
    try:
        result["settings"] = flat_settings(OmegaConf.to_container(OmegaConf.load(config))) if config.exists() else {}
    except Exception as err:  # a hand-edited or cut-short YAML file: any parser failure means the same
        raise SelectuneError(f"its config.yaml is not readable ({type(err).__name__})") from None
    return result


def metrics_file(run_dir: Path) -> Path | None:
    """A run's metrics.jsonl, or the gzip-compressed copy a kept run has (results/, written by
    scripts/reproduction/keep_runs.sh)."""
    for name in ("metrics.jsonl", "metrics.jsonl.gz"):
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def metrics_lines(path: Path) -> list[str]:
    """The lines of a metrics.jsonl, plain or .gz."""
    if path.suffix == ".gz":
        import gzip

        with gzip.open(path, "rt", errors="replace") as handle:
            return handle.read().splitlines()
    return path.read_text(errors="replace").splitlines()


def read_losses(path: Path) -> list[tuple[int, float]]:
    """(step, training loss) from a metrics.jsonl (or .gz); a line that is no such record is skipped with a
    warning."""
    steps = []
    for number, line in enumerate(metrics_lines(path), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            if line.strip():
                warn(f"skipping {path}:{number}: not a JSON record with a step")
            continue
        loss = record.get("loss")
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            steps.append((record["step"], float(loss)))
    return steps


def flat_settings(node: Any, prefix: str = "") -> dict[str, str]:
    """A config as dotted key -> JSON value: what the report compares runs on (and adopt_winners a recipe)."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in flat_settings(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: json.dumps(node)}


def variants(runs: list[dict[str, Any]], across_tasks: bool = False) -> list[str]:
    """Per run, the label of its variant: "" for a run of a recipe as the recipe stands today.

    A run made from a recipe (its config.yaml is a whole selectune config and `<family>/<task>_<method>`
    is a recipe) is named by the settings in which it departs from that recipe — seeds and bookkeeping
    aside — so one label means one variant on every task, even where the recipes set a per-task value
    (AdaLoRA's γ is 0.1 on MRPC and 0.3 on RTE), and a run older than a recipe change is named by the
    old value (`sara (trainer.lr=0.0005)`); a setting newer than the run and null in the recipe is no
    change. Other runs are named by the settings in which the runs of their task, method and stored count
    differ; with across_tasks, by every setting in which the method's runs differ within *some* task (the
    per-task table alone would call a variant plain on a task where only it was run). Settings of the task
    itself (`task.*`) never name those variants."""
    recipes: dict[str, dict[str, str] | None] = {}
    experiments: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        experiments[(run["task"], run["method"], budget_key(run))].append(run)
    if across_tasks:
        per_task: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for run in runs:
            per_task[(run["task"], run["method"])].append(run)
        by_method: dict[str, set[str]] = defaultdict(set)
        for (_, method), members in per_task.items():
            by_method[method] |= _differing(members, NOT_A_VARIANT + ("task.",))
        differing = {key: sorted(by_method[key[1]]) for key in experiments}
    else:
        differing = {key: sorted(_differing(members, NOT_A_VARIANT)) for key, members in experiments.items()}

    labels = []
    for run in runs:
        recipe = _recipe_settings(run, recipes)
        if recipe is None:
            keys = differing[(run["task"], run["method"], budget_key(run))]
        else:
            # a setting a run predates reads as null: a key is added with the default that keeps the old behaviour
            keys = sorted(k for k in set(run["settings"]) | set(recipe) if not k.startswith(NOT_A_VARIANT)
                          and run["settings"].get(k, "null") != recipe.get(k, "null"))
            if _asks_the_same(run, recipe):  # one budget written another way (a count, a count beyond the head)
                keys = [k for k in keys if not k.startswith("budget.")]
        labels.append(", ".join(f"{k.partition('.')[2] if k.startswith('method.') else k}={_shown(run, k)}"
                                for k in keys))
    return labels


def budget_key(run: dict[str, Any]) -> int:
    """The budget a run belongs to: the count it was asked to store where it was given one, else what it stored.
    A method whose stored count moves with the seed under one budget (AdaLoRA's trimmed delta: b(T) fixes
    triplets, not numbers, and which matrices keep them differs by seed) stays one row, not one row per count."""
    asked = run["budget"].get("asked")
    return asked if isinstance(asked, int) and not isinstance(asked, bool) else run["budget"]["stored"]


def _asks_the_same(run: dict[str, Any], recipe: dict[str, str]) -> bool:
    """Whether the recipe's budget, on this run's backbone and head, asks the count the run asked: a run of
    `budget.count=155146` and a recipe of `budget.beyond_head=147456` on a 7,690-value head are one budget."""
    asked = run["budget"].get("asked")
    written = {k: json.loads(recipe.get(f"budget.{k}", "null")) for k in ("fraction", "count", "beyond_head")}
    try:
        return asked is not None and BudgetConfig(**written).resolve(run["budget"]["backbone"],
                                                                     run["budget"]["head"]) == asked
    except SelectuneError:  # a recipe giving two of them: not this run's budget
        return False


def _shown(run: dict[str, Any], key: str) -> str:
    """A setting's value as an override would write it; "unset" for a run older than the setting."""
    if key not in run["settings"]:
        return "unset"
    value = json.loads(run["settings"][key])
    return f"[{','.join(map(str, value))}]" if isinstance(value, list) else str(value)


def _recipe_settings(run: dict[str, Any], cache: dict[str, dict[str, str] | None]) -> dict[str, str] | None:
    """The flattened config of the recipe `run` was made from, as composed today; None for a run whose
    config is not a whole selectune config or whose task and method name no recipe."""
    if not {"model", "task", "method", "trainer"} <= {k.partition(".")[0] for k in run["settings"]}:
        return None
    name = f"{run.get('family', 'glue')}/{run['task']}_{run['method']}"
    if name not in cache:
        from selectune.config import compose
        from selectune.recipes import list_recipes

        cache[name] = None
        if name in list_recipes():
            cache[name] = flat_settings(OmegaConf.to_container(compose("train", [f"recipe={name}"]), resolve=True))
    return cache[name]


def _differing(members: list[dict[str, Any]], skip: tuple[str, ...]) -> set[str]:
    """The settings, outside `skip`, that do not hold one value over `members` (missing counts as a value)."""
    return {k for k in set().union(*(m["settings"].keys() for m in members))
            if not k.startswith(skip) and len({m["settings"].get(k) for m in members}) > 1}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def spread(mean: float, std: float, n: int, sign: str = "") -> str:
    """`83.00 ± 1.41` over n > 1 seeds; one seed has no spread, so it prints the value alone (a `± 0.00`
    would read as a measured, perfectly stable result)."""
    return f"{mean:{sign}.2f} ± {std:.2f}" if n > 1 else f"{mean:{sign}.2f}"


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, method, budget, variant, reported split): metrics as mean and std over the runs' seeds;
    the stored count as their mean and, where it differs between them, its range."""
    groups: dict[tuple[str, str, int, str, str], list[dict[str, Any]]] = defaultdict(list)
    for run, variant in zip(runs, variants(runs), strict=True):
        groups[(run["task"], run["method"], budget_key(run), variant, next(iter(run["metrics"])))].append(run)
    rows = []
    for (task, method, _, variant, split), members in sorted(groups.items()):
        counts = sorted(m["budget"]["stored"] for m in members)
        method = f"{method} ({variant})" if variant else method
        metrics = {}
        for name in members[0]["metrics"][split]:
            values = [m["metrics"][split][name] for m in members if m["metrics"][split][name] is not None]
            if values:
                metrics[name] = mean_std(values)
        family = members[0].get("family", "vtab" if task not in GLUE else "glue")
        rows.append({"task": task, "method": method, "stored": round(statistics.mean(counts)),
                     "stored_range": (counts[0], counts[-1]), "split": split, "metrics": metrics,
                     "family": family,
                     "primary": GLUE[task].primary if task in GLUE else next(iter(metrics)),
                     "seeds": sorted(m["seed"] for m in members), "backbone": members[0]["budget"]["backbone"],
                     "delta_bytes": statistics.mean(m["delta_bytes"] for m in members),
                     "step_time_s": statistics.mean(m["step_time_s"] for m in members),
                     "phase_step_time_s": _phase_times(members),
                     "peak_memory_mb": statistics.mean(m["peak_memory_mb"] for m in members),
                     "top_label_share": _top_label_share(members, split),
                     "precisions": _seeds_by(members, "precision"),
                     "machines": _seeds_by(members, "machine"),
                     "runs": [m["run_dir"] for m in members]})
    return rows


def _top_label_share(members: list[dict[str, Any]], split: str) -> tuple[float, int] | None:
    """The share of the split's rows predicted as the most-predicted label (the mean over the runs that recorded
    their predictions, and how many did): near 100% is a head collapsed to one class. None where no run did
    (regression, or runs from before results.json kept `predictions`)."""
    shares = []
    for member in members:
        counts = member.get("predictions")
        counts = counts.get(split) if isinstance(counts, dict) else None  # a hand-edited file: checked, not trusted
        if isinstance(counts, dict) and counts and all(type(n) is int and n >= 0 for n in counts.values()) \
                and sum(counts.values()) > 0:
            shares.append(max(counts.values()) / sum(counts.values()))
    return (statistics.mean(shares), len(shares)) if shares else None


def _seeds_by(members: list[dict[str, Any]], key: str) -> dict[str, list[int]]:
    """The seeds by a results.json string: `precision` (what `trainer.precision=auto` resolved to on the machine
    that ran it) or `machine` (what timed it); `unrecorded` for runs from before it was kept. A row whose seeds
    ran on different hardware says so."""
    seen: dict[str, list[int]] = defaultdict(list)
    for member in members:
        value = member.get(key)
        seen[value if isinstance(value, str) and value else "unrecorded"].append(member["seed"])
    return {name: sorted(seeds) for name, seeds in sorted(seen.items())}


def _seeds_shown(row: dict[str, Any], name_precision: bool) -> str:
    """`42,43,44`; with `name_precision` (the table's runs trained in more than one precision) each row says in
    which: `42,43,44 (fp32)`, or `42,43,44 (bf16: 42; fp32: 43,44)` where its own seeds differ."""
    shown = ",".join(map(str, row["seeds"]))
    precisions = row.get("precisions") or {}
    if len(precisions) == 1 and name_precision:
        shown += f" ({next(iter(precisions))})"
    elif len(precisions) > 1:
        shown += " (" + "; ".join(f"{name}: {','.join(map(str, seeds))}" for name, seeds in precisions.items()) + ")"
    return shown


def _phase_times(members: list[dict[str, Any]]) -> dict[str, float]:
    """Mean s/step of each phase over the runs that recorded it (results.json's step_time_s_by_phase), for a
    method with phases (diff pruning: "1", "2"); {} when none did or there is only one phase."""
    seen: dict[str, list[float]] = {}
    for member in members:
        phases = member.get("step_time_s_by_phase")
        if isinstance(phases, dict) and len(phases) > 1:
            for phase, value in phases.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    seen.setdefault(str(phase), []).append(float(value))
    return {phase: statistics.mean(values) for phase, values in sorted(seen.items())}


def _phases_shown(row: dict[str, Any]) -> str:
    phases = row.get("phase_step_time_s") or {}
    return f" (phase {', phase '.join(f'{k}: {v:.2f}' for k, v in phases.items())})" if phases else ""


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | method | primary metric | all metrics (split) | seeds | stored params | % of backbone | "
             "delta on disk | s/step | peak memory | top label share |", "|---" * 11 + "|"]
    mixed = len({name for r in rows for name in r.get("precisions") or {}}) > 1
    machines = list(dict.fromkeys(name for r in rows for name in r.get("machines") or {}))
    labels = {name: f"m{i}" for i, name in enumerate(machines, 1)} if len(machines) > 1 else {}
    for r in rows:
        primary = r["metrics"].get(r["primary"])
        n = len(r["seeds"])
        shown = "n/a" if primary is None else f"{r['primary']} {spread(*primary, n)}"
        others = ", ".join(f"{k} {spread(m, s, n)}" for k, (m, s) in r["metrics"].items()) + f" ({r['split']})"
        step_time = f"{r['step_time_s']:.2f}{_phases_shown(r)}{_machines_shown(r, labels)}"
        lines.append(f"| {r['task']} | {r['method']} | {shown} | {others} | {_seeds_shown(r, mixed)} | "
                     f"{_stored_shown(r)} | {100 * r['stored'] / r['backbone']:.3f}% | "
                     f"{r['delta_bytes'] / 2**20:.2f} MiB | {step_time} | "
                     f"{r['peak_memory_mb'] / 1024:.2f} GiB | "
                     f"{_share_shown(r.get('top_label_share'), len(r['seeds']))} |")
    if labels:
        lines += ["", "s/step timed on different machines (a row's seeds by machine in brackets): "
                  + "; ".join(f"{label} = {name}" + (" (runs from before results.json kept the machine)"
                                                      if name == "unrecorded" else "")
                              for name, label in labels.items()) + "."]
    elif machines and machines[0] != "unrecorded":
        lines += ["", f"s/step timed on {machines[0]}."]
    return "\n".join(lines)


def _stored_shown(row: dict[str, Any]) -> str:
    """`222,338`, or `217,793 (215,489-218,945)`: the mean and range where the seeds stored different counts."""
    low, high = row["stored_range"]
    return f"{row['stored']:,}" + (f" ({low:,}-{high:,})" if low != high else "")


def _machines_shown(row: dict[str, Any], labels: dict[str, str]) -> str:
    """` [m1]`, or ` [m1: 42; m2: 43,44]` where a row's seeds ran on different machines; `` where the table
    was timed on one."""
    machines = row.get("machines") or {}
    if not labels or not machines:
        return ""
    if len(machines) == 1:
        return f" [{labels[next(iter(machines))]}]"
    return " [" + "; ".join(f"{labels[name]}: {','.join(map(str, seeds))}" for name, seeds in machines.items()) + "]"


def _share_shown(share: tuple[float, int] | None, seeds: int) -> str:
    """`55%`, or `55% (2 of 3 runs)` where only some recorded predictions; `—` where none did."""
    if share is None:
        return "—"
    value, runs = share
    return f"{100 * value:.0f}%" + (f" ({runs} of {seeds} runs)" if runs < seeds else "")


def _cells(runs: list[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(method label, column) -> [(seed, score)], labels as in `variants(across_tasks=True)`. A GLUE run's column
    is its task, scored by the task's primary dev metric; an image run's is `task (split)`, scored by accuracy
    on that split: the final protocol's test split, or val200 for select runs (a task's runs on both are not
    compared: the split is part of the column). Other runs have no column."""
    cells: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for run, variant in zip(runs, variants(runs, across_tasks=True), strict=True):
        split = next(iter(run["metrics"]), None)
        if run["task"] in GLUE:
            column, score = run["task"], run["metrics"][split][GLUE[run["task"]].primary]
        elif run.get("family") == "vtab" and split and "accuracy" in run["metrics"][split]:
            column, score = f"{run['task']} ({split})", run["metrics"][split]["accuracy"]
        else:
            continue
        label = f"{run['method']} ({variant})" if variant else run["method"]
        cells[(label, column)].append((run["seed"], score))
    return cells


def _glue_tasks(cells: dict[tuple[str, str], Any]) -> list[str]:
    """The GLUE tasks the cells hold, in GLUE's order (the papers' column order)."""
    return [t for t in GLUE if any(task == t for _, task in cells)]


def _glue_header(first: str, tasks: list[str]) -> list[str]:
    """A matrix's header: a GLUE task with its primary metric, an image column (`task (split)`) as it is."""
    return ["| " + first + " | " + " | ".join(f"{t} ({GLUE[t].primary})" if t in GLUE else t for t in tasks)
            + " | average |", "|---|" + "---|" * (len(tasks) + 1)]


def glue_matrix(runs: list[dict[str, Any]]) -> str:
    """Methods × GLUE tasks, as the papers print it: each task's primary dev metric (mean ± std over
    seeds, with the seed count), and the average over the tasks — only for a method that has every task
    of the table, so an average is never taken over a different set of tasks. "" for under two tasks."""
    cells = {key: [value for _, value in members] for key, members in _cells(runs).items() if key[1] in GLUE}
    tasks = _glue_tasks(cells)
    if len(tasks) < 2:
        return ""
    lines = _glue_header("method", tasks)
    stats = {key: mean_std(values) for key, values in cells.items()}
    for label in sorted({label for label, _ in cells}):
        shown = []
        for task in tasks:
            key = (label, task)
            shown.append(f"{spread(*stats[key], len(cells[key]))} ({len(cells[key])})" if key in stats else "—")
        complete = all((label, t) in stats for t in tasks)
        average = statistics.mean(stats[(label, t)][0] for t in tasks) if complete else None
        lines.append(f"| {label} | " + " | ".join(shown) + f" | {'—' if average is None else f'{average:.2f}'} |")
    return "\n".join(lines)


def parse_pair(text: str) -> tuple[str, str]:
    """`sdiff:full` -> ("sdiff", "full"): the form of `pair=` (CLI) and `--pair` (scripts/analysis/results_table.py)."""
    first, _, second = text.partition(":")
    if not first or not second:
        raise SelectuneError("pair= takes two method labels as the report names them: pair=sdiff:full")
    return first, second


def _pair_label(name: str, labels: set[str]) -> str:
    """The report label `pair=` means: itself, or the one label whose method is `name` (`lora` for
    `lora (trainer.lr=0.001)`); several such labels are named for the user to pick one."""
    if name in labels:
        return name
    matches = sorted(label for label in labels if label.split(" (", 1)[0] == name)
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise SelectuneError(f"report: pair label {name!r} fits {len(matches)} labels; give one whole: "
                             f"{', '.join(repr(m) for m in matches)}")
    raise SelectuneError(f"report: no run is labelled {name!r} (labels: {', '.join(sorted(labels))})")


def paired(runs: list[dict[str, Any]], pairs: list[tuple[str, str]]) -> str:
    """Method A − method B per task (GLUE: the primary dev metric; images: accuracy on the run's split) on the
    seeds both have, so a difference is never one of seed luck: mean ± sample std of the per-seed differences,
    the seeds, and on how many A ≥ B; the average over the tasks only where every task of the table has a
    common seed. Labels as in `glue_matrix`."""
    cells = _cells(runs)
    tasks = _glue_tasks(cells) + sorted({column for _, column in cells if column not in GLUE})
    lines = _glue_header("A − B", tasks)
    labels = {label for label, _ in cells}
    for a, b in pairs:
        a, b = (_pair_label(label, labels) for label in (a, b))
        shown, means = [], []
        for task in tasks:
            first, second = (_by_seed(cells.get((label, task), []), label, task) for label in (a, b))
            seeds = sorted(set(first) & set(second))
            if not seeds:
                shown.append("—")
                continue
            diffs = [first[s] - second[s] for s in seeds]
            mean, std = mean_std(diffs)
            means.append(mean)
            wins = sum(d >= 0 for d in diffs)
            shown.append(f"{spread(mean, std, len(seeds), '+')} (seeds {','.join(map(str, seeds))}; "
                         f"A ≥ B on {wins}/{len(seeds)})")
        average = f"{statistics.mean(means):+.2f}" if len(means) == len(tasks) else "—"
        lines.append(f"| {a} − {b} | " + " | ".join(shown) + f" | {average} |")
    return "\n".join(lines)


def _by_seed(members: list[tuple[int, float]], label: str, task: str) -> dict[int, float]:
    seeds = [seed for seed, _ in members]
    if len(set(seeds)) < len(seeds):
        raise SelectuneError(f"report: {label} has two {task} runs of one seed; a paired difference needs one per seed")
    return dict(members)


def vtab_averages(rows: list[dict[str, Any]]) -> str:
    """Per method, both VTAB averages over its image tasks (always labelled: papers mix the two)."""
    from selectune.tasks.vtab import averages

    lines = []
    image = [r for r in rows if r.get("family") == "vtab" and "accuracy" in r["metrics"]]
    for method, split in sorted({(r["method"], r["split"]) for r in image}):  # val200 and test never averaged
        accuracy = {r["task"]: r["metrics"]["accuracy"][0] for r in image
                    if (r["method"], r["split"]) == (method, split)}
        a = averages(accuracy)
        groups = ", ".join(f"{k[:-5]} {v:.2f}" for k, v in a.items() if k.endswith("_mean") and k != "mean_of_tasks")
        lines.append(f"| {method} | {split} | {a['tasks']} | {a['mean_of_tasks']:.2f} | "
                     f"{a['mean_of_group_means']:.2f} | {groups} |")
    if not lines:
        return ""
    return ("| method | split | image tasks | mean of tasks | mean of group means | group means |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(lines))


def plots(rows: list[dict[str, Any]], runs: list[dict[str, Any]], out: Path) -> list[str]:
    from selectune.plots import _pyplot

    plt = _pyplot()
    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for method in sorted({r["method"] for r in rows if r["task"] == task}):
            points = sorted((r["stored"], *r["metrics"].get(r["primary"], (float("nan"), 0.0)))
                            for r in rows if r["task"] == task and r["method"] == method)
            xs, ys, es = zip(*points, strict=True)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("stored parameters per task")
        ax.set_ylabel(f"dev {next(r['primary'] for r in rows if r['task'] == task)}")
        ax.set_title(task)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False, ncol=2)  # below
    fig.tight_layout()
    fig.savefig(out / "metric_vs_budget.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    # one panel per task: losses of different scales (STS-B's MSE, a classification's cross-entropy) never
    # share an axis; a run with one logged point is drawn as a marker, not an invisible line
    curves = {}
    for run in runs:
        path = metrics_file(Path(run["run_dir"]))
        steps = read_losses(path) if path is not None else []
        if steps:
            curves.setdefault(run["task"], []).append((f"{run['method']} s{run['seed']}", steps))
    names = sorted(curves) or ["(no training losses)"]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4.2), squeeze=False)
    for ax, task in zip(axes[0], names, strict=True):
        for label, steps in curves.get(task, []):
            ax.plot(*zip(*steps, strict=True), label=label, lw=1, marker="o" if len(steps) == 1 else None)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        if curves.get(task):
            ax.legend(fontsize=6, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return ["metric_vs_budget.png", "training_curves.png"]


REPORT_FILES = ("report.md", "metric_vs_budget.png", "training_curves.png")


def report(folders: list[Path], out: Path | None = None, pairs: list[tuple[str, str]] | None = None) -> Path:
    runs = collect(folders)
    rows = summarise(runs)
    differences = paired(runs, pairs) if pairs else ""  # a wrong label fails here, before anything is written
    out = out or folders[0]
    runfs.make_dir(out, "out")
    for name in REPORT_FILES:  # never through a symbolic link planted in `out`
        runfs.check_target(out / name, out)
    try:
        images = plots(rows, runs, out)
    except OSError as err:
        raise SelectuneError(f"cannot write the report to out={out}: {err.strerror or err}") from None
    averages = vtab_averages(rows)
    if averages:
        averages = "\nVTAB-1k averages (both conventions; over the image tasks present):\n\n" + averages + "\n"
        print(averages)
    matrix = glue_matrix(runs)
    if matrix:
        matrix = "\nGLUE, primary dev metric per task (seeds in brackets) and its average:\n\n" + matrix + "\n"
        print(matrix)
    if differences:
        differences = f"\nPaired on the seeds both methods have (A − B, primary dev metric):\n\n{differences}\n"
        print(differences)
    text = (f"# selectune report\n\n{len(runs)} runs from {', '.join(map(str, folders))}; mean ± sample std over "
            f"seeds (a one-seed row: its value alone); dev split; each run's own selection rule (see its "
            f"results.json).\n\n{markdown(rows)}\n"
            f"{averages}{matrix}{differences}\n"
            + "\n".join(f"![{name}]({name})" for name in images) + "\n")
    try:
        runfs.write_text(out / "report.md", text, out)
    except OSError as err:
        raise SelectuneError(f"cannot write the report to out={out}: {err.strerror or err}") from None
    print(markdown(rows))
    print(f"\nwrote {out / 'report.md'} and {', '.join(images)}")
    return out / "report.md"
