"""What each subcommand does, given a composed config: recipe -> task -> backbone -> method -> trainer
-> delta. The CLI (cli.py) only parses arguments and reports errors; the work is here."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from selectune import __version__, distributed, runfs
from selectune.backbone import Backbone, load_backbone
from selectune.errors import SelectuneError
from selectune.methods.base import ProbeBatches
from selectune.runspec import RunSpec
from selectune.tasks import Task, is_causal, load_task
from selectune.tasks.batches import EncodedSplit, train_batches
from selectune.trainer import Trainer, format_metrics, resolve_device, task_loss

if TYPE_CHECKING:  # imported where used: loading a delta is not on every command's start-up path
    from selectune.delta.taskdelta import TaskDelta

log = logging.getLogger(__name__)
console = Console(stderr=True)
RUN_OUTPUTS = ("metrics.jsonl", "checkpoint", "results.json", "delta.safetensors")
PROBE_OUTPUTS = ("summary.json", "sensitivity.safetensors")  # what `selectune probe` writes


def build(spec: RunSpec, task: Task):
    """Backbone with the task's head, and the method attached to it."""
    from selectune.methods import build_method

    labels = task.spec.labels if not task.spec.is_regression else None
    backbone = load_backbone(spec.model, task.spec.num_labels, task.spec.is_regression, labels,
                             spec.trainer.seed, causal_lm=is_causal(task.spec))
    budget = spec.budget.resolve(backbone.num_base_parameters, backbone.num_head_parameters)
    method = build_method(spec.method, budget)
    return backbone, method


def probe_batches(task: Task, split: EncodedSplit, backbone: Backbone, batch_size: int, seed: int,
                  device: torch.device, ctx: distributed.Context = distributed.Context()) -> ProbeBatches:  # noqa: B008
    """The first n training batches in a fixed, seeded order (the order of epoch 0), for methods that
    look at gradients before training; with several processes each takes its share of every batch
    and per-batch gradients are averaged over the ranks (`reduce`) before a method squares them."""

    def batches(n: int):
        for rows in train_batches(len(split), batch_size, seed, epoch=0)[:n]:
            mine = ctx.shard(rows)
            yield {k: v.to(device) for k, v in split.batch(mine).items()}

    return ProbeBatches(batches, lambda logits, labels: task_loss(logits, labels, task.spec.is_regression),
                        ctx.mean_)


def encode_splits(task: Task, backbone: Backbone, names: list[str]) -> dict[str, EncodedSplit]:
    return {name: task.encode(name, backbone) for name in names}


# --------------------------------------------------------------------------- train
def train(cfg: DictConfig, run_dir: Path, explicit_out_dir: bool = True, stage: Path | None = None,
          owned: bool = False, on_eval: Callable[[int, float], bool] | None = None) -> dict[str, Any]:
    """Train into `run_dir`, owning it (a lock) for the whole run.

    Every refusal (a finished or unfinished run there, another process, a changed config on resume, a
    symbolic link) comes before anything is written: `stage` holds what Hydra wrote meanwhile and is moved
    in only once the run proceeds. On failure before a checkpoint exists, what this call added is removed
    (the whole folder if it made it, or `owned`: Hydra made it for this job)."""
    spec = RunSpec.from_config(cfg)
    ctx = distributed.setup(spec.trainer.device)
    distributed.check_out_dir(ctx, explicit_out_dir)
    created, before, error = False, None, None
    try:
        if ctx.main:
            runfs.check_folder(run_dir)
            created = runfs.make_run_dir(run_dir) or owned
            runfs.lock_run_dir(run_dir)
            before = set(os.listdir(run_dir))
        check_run_dir(run_dir, spec, cfg)
    except SelectuneError as err:
        error = err
    problems = [p for p in ctx.gather(None if error is None else str(error)) if p]  # every rank stops, or none
    try:
        if problems:
            raise error or SelectuneError(problems[0])
        return _train(cfg, spec, ctx, run_dir, stage if ctx.main else None, on_eval)
    except (SelectuneError, KeyboardInterrupt, OSError) as err:
        if ctx.main and (created or not problems) and not (run_dir / "checkpoint").exists():
            _remove_new(run_dir, before or set(), created)  # nothing worth keeping: no half-written run left
        if isinstance(err, OSError):
            raise SelectuneError(f"could not write the run in {run_dir}: {err.strerror or err}"
                                 + (f" ({err.filename})" if err.filename else "")) from err
        raise
    finally:
        if ctx.main:
            runfs.unlock_run_dir(run_dir)


def _remove_new(run_dir: Path, before: set[str], created: bool) -> None:
    """Undo a failed run: remove the entries it added to `run_dir`, and the folder itself if it made it."""
    if created:
        remove_run_dir(run_dir)
        return
    for name in set(os.listdir(run_dir)) - before:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def check_run_dir(run_dir: Path, spec: RunSpec, cfg: DictConfig) -> None:
    """Refuse a run folder this run must not write into: a finished run, an unfinished one without
    trainer.resume=true, a resume whose config differs, or a folder holding a symbolic link."""
    if (run_dir / "results.json").exists():
        raise SelectuneError(f"{run_dir} already holds a finished run; choose another out_dir")
    probe_outputs = [name for name in PROBE_OUTPUTS if (run_dir / name).exists()]
    if probe_outputs:
        raise SelectuneError(f"{run_dir} holds a probe ({probe_outputs[0]}); choose another out_dir")
    unfinished = [name for name in (*RUN_OUTPUTS, "config.yaml") if (run_dir / name).exists()]
    if unfinished and not spec.trainer.resume:
        raise SelectuneError(f"{run_dir} holds an unfinished run {_progress(run_dir)}: add trainer.resume=true, "
                             f"or choose another out_dir")
    saved_cfg = run_dir / "config.yaml"
    if spec.trainer.resume and saved_cfg.exists():
        before = OmegaConf.to_container(OmegaConf.load(saved_cfg))
        if _comparable(before) != _comparable(OmegaConf.to_container(cfg, resolve=True)):
            raise SelectuneError(f"trainer.resume=true but the config differs from the one {run_dir} was "
                                 f"started with ({saved_cfg}); resume with the same overrides")
    runfs.check_no_links(run_dir)


def _progress(run_dir: Path) -> str:
    """`at step N` from an unfinished run's checkpoint (or why no step can be named)."""
    from selectune import checkpoint

    if not checkpoint.exists(run_dir):
        return "(stopped before its first checkpoint)"
    try:
        return f"at step {checkpoint.read(run_dir)['step']}"
    except Exception:  # a damaged checkpoint still marks the folder as taken
        return "(its checkpoint cannot be read)"


def _train(cfg: DictConfig, spec: RunSpec, ctx: distributed.Context, run_dir: Path,
           stage: Path | None, on_eval: Callable[[int, float], bool] | None = None) -> dict[str, Any]:
    saved_cfg = run_dir / "config.yaml"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(spec.trainer.seed)
    task = load_task(spec.task)
    backbone, method = build(spec, task)
    base_hash = backbone.base_hash()
    splits = encode_splits(task, backbone, list(task.splits))
    device = distributed.device_for(ctx, resolve_device(spec.trainer.device))
    backbone.model.to(device)  # before attach: probes and selections run where training will
    method.attach(backbone, probe_batches(task, splits["train"], backbone, spec.trainer.batch_size,
                                          spec.trainer.seed, device, ctx))
    if ctx.active:  # dropout and diff-pruning noise: an independent stream per rank
        torch.manual_seed(spec.trainer.seed + 7919 * ctx.rank)
    report = method.report()
    decided = method.describe()

    def proceed() -> None:
        """Every check has passed (the checkpoint of a resume read and fitted too): the first writes."""
        runfs.PROCEEDED.append(run_dir)  # on every rank: a sweep whose job ran keeps Hydra's record of it
        if not ctx.main:
            return
        header = (f"{task.name} · {method.cfg.name} · {backbone.name} · {len(splits['train']):,} train examples · "
                  f"{report.line()}" + (f" · {readable(decided)}" if decided else "")
                  + (f" · {ctx.world} processes" if ctx.active else ""))
        console.print(header, markup=False, highlight=False)
        if stage is not None:  # what Hydra logged meanwhile moves in
            runfs.adopt_staging(stage, run_dir)
        log.info("%s", header)  # train.log: the same lines a person saw (the loop logs its own)
        runfs.write_hydra_record(run_dir, cfg)
        runfs.write_text(saved_cfg, OmegaConf.to_yaml(OmegaConf.create(resolved)), run_dir)

    meta = {"base_model": backbone.name, "base_hash": base_hash, "method": method.cfg.name, "task": task.name,
            "budget": report.as_dict(), "seed": spec.trainer.seed, "selectune_version": __version__,
            "config": resolved}

    def save_delta(path: Path) -> int:
        from selectune.delta.taskdelta import TaskDelta

        return TaskDelta(method.delta(), {**meta, "method_state": method.describe()}).save(path, cfg.get("compact"))

    trainer = Trainer(spec.trainer, task, method, splits, run_dir, save_delta, console, ctx, on_eval)
    outcome = trainer.fit(proceed)
    results = {"task": task.name, "family": spec.task.family, "method": method.cfg.name, "model": backbone.name,
               "seed": spec.trainer.seed, **outcome, "budget": method.report().as_dict(),
               "method_state": method.describe(), "base_hash": base_hash, "selectune_version": __version__}
    if not ctx.main:
        return results
    runfs.write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n", run_dir)
    console.print(f"[bold green]done[/] · {results['selection']} (step {results['selected_step']}): "
                  f"{format_metrics(results['metrics'])} · delta {results['delta_bytes']:,} bytes · {run_dir}")
    log.info("done · %s (step %s): %s · %s", results["selection"], results["selected_step"],
             format_metrics(results["metrics"]), run_dir)
    print(run_dir, flush=True)  # stdout's last line: the folder `eval`/`export run=` take (RUN=$(selectune train ...))
    return results


def readable(decided: dict[str, Any]) -> str:
    """What a method decided, for a person: `selected 112,796 · threshold 0.0123 · 6 mask hashes`, not JSON
    (the full record is in results.json's method_state)."""
    parts = []
    for key, value in decided.items():
        name = key.replace("_", " ")
        if value is None:
            continue
        if isinstance(value, bool):
            parts.append(f"{name} {'yes' if value else 'no'}")
        elif isinstance(value, int):
            parts.append(f"{name} {value:,}")
        elif isinstance(value, float):
            parts.append(f"{name} {value:.4g}")
        elif isinstance(value, (list, tuple, dict)):
            parts.append(f"{len(value)} {name}" if len(value) != 1 or isinstance(value, dict)
                         else f"{name} {value[0]}")
        else:
            parts.append(f"{name} {value}")
    return " · ".join(parts)


def _comparable(config: Any) -> Any:
    """A run's config minus what may change between a start and its resume."""
    config = json.loads(json.dumps(config))
    config.get("trainer", {}).pop("resume", None)
    config.get("trainer", {}).pop("progress", None)
    trainer = config.get("trainer", {})
    trainer.pop("checkpoint_minutes", None)  # when to save changes no result (and is newer than older runs)
    trainer.pop("grad_accum", None)  # how many passes a batch takes: memory, not the result
    if trainer.get("patience", 0) is None:  # unset: the same as a run from before the key existed
        trainer.pop("patience")
    config.pop("out_dir", None)
    return config


def remove_run_dir(run_dir: Path) -> None:
    """Remove a run dir this invocation created, and the parents Hydra made for it below the working
    directory (runs/<name>/) once they are empty; folders outside the working directory are left."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cwd = Path.cwd().resolve()
    parent = run_dir.parent
    while parent.resolve() != cwd and parent.resolve().is_relative_to(cwd):
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent


# --------------------------------------------------------------------------- eval
def delta_on_task(path: Path, task_node: DictConfig | None = None, max_examples: int | None = None,
                  force: bool = False) -> tuple[TaskDelta, Task, Backbone, str]:
    """A stored TaskDelta applied to its base model, with the task it is to be scored on (its own by default,
    data from SELECTUNE_DATA, never a folder the delta file names): (delta, task, backbone, task trained on).

    Refuses another task than its own unless `force`, and a base whose weights differ from those it was trained
    on. The task scores its whole eval splits (`max_examples` rows at most where given) and dev beside a sweep
    candidate's `val`. What `selectune eval` scores, and what a script scoring a stored delta should build on."""
    from selectune.delta.taskdelta import TaskDelta

    delta = TaskDelta.load(path)
    cfg = OmegaConf.create(delta.meta["config"])
    trained_on = str(delta.meta.get("task", cfg.task.get("name")))
    if task_node is not None:
        if str(task_node.get("name")) != trained_on and not force:
            raise SelectuneError(f"this delta was trained on {trained_on}, not {task_node.get('name')}: its head "
                                 f"predicts {trained_on}'s labels; pass force=true to score it anyway")
        cfg.task = task_node
    elif isinstance(cfg.get("task"), DictConfig):  # the data it is scored on is the user's: SELECTUNE_DATA,
        cfg.task.data_root = None                    # never a folder the delta file names
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples <= 0):
        raise SelectuneError(f"max_eval_examples={max_examples!r}: a positive number of examples, or null for all")
    cfg.task.max_eval_examples = max_examples
    if "score_dev" in cfg.task:  # a sweep candidate left dev unscored while training; asked now, it is scored
        cfg.task.score_dev = True
    spec = RunSpec.from_config(cfg)
    task = load_task(spec.task)
    backbone, _ = build(spec, task)
    if backbone.base_hash() != delta.meta["base_hash"]:
        raise SelectuneError(f"the base weights of '{backbone.name}' differ from those the delta was trained on "
                             f"(hash {backbone.base_hash()} != {delta.meta['base_hash']})")
    delta.apply_to(backbone.model)
    return delta, task, backbone, trained_on


def evaluate_delta(run: str, task_node: DictConfig | None, batch_size: int, device: str,
                   max_examples: int | None = None, force: bool = False) -> dict[str, Any]:
    """Evaluate a stored TaskDelta on a task's dev split(s) (the task it was trained on by default).

    The whole split is scored unless `max_examples` says otherwise: the training run's own
    `task.max_eval_examples` (a quick run's 64) is not inherited, so a number printed here is a dev-set
    number; nor is `task.score_dev=false` (a sweep candidate's): dev is scored beside its `val`. Scoring a
    delta on another task than its own is refused unless `force`: its head was trained for the other task's
    labels, and the score would be silently meaningless."""
    from selectune.evaluation import evaluate, prediction_counts

    path = Path(run)
    delta, task, backbone, trained_on = delta_on_task(path, task_node, max_examples, force)
    target = resolve_device(device)
    backbone.model.to(target)
    splits = encode_splits(task, backbone, task.eval_splits)
    metrics, outputs = evaluate(backbone.model, task, splits, batch_size, target)
    examples = {name: len(split) for name, split in splits.items()}
    result = {"run": str(path), "task": task.name, "trained_on": trained_on, "method": delta.meta["method"],
              "examples": examples, "max_eval_examples": max_examples, "metrics": metrics}
    predictions = prediction_counts(task, outputs)
    if predictions is not None:
        result["predictions"] = predictions  # per split, rows predicted per label: a collapsed head shows here
    out_dir = path if path.is_dir() else path.parent
    # a partial score never overwrites (or passes for) the whole split's
    name = f"eval_{task.name}.json" if max_examples is None else f"eval_{task.name}_first{max_examples}.json"
    runfs.write_text(out_dir / name, json.dumps(result, indent=2) + "\n", out_dir)
    scope = "whole split" if max_examples is None else f"first {max_examples} at most"
    counts = ", ".join(f"{split} {n:,}" for split, n in examples.items())
    print(f"{task.name} · {delta.meta['method']} · {counts} examples ({scope}) · {format_metrics(metrics)}")
    return result


# --------------------------------------------------------------------------- validate / ls / cat
def validate(cfg: DictConfig) -> None:
    """Compose, build task + model + method on a few examples, run one forward/backward, print the budget.

    Everything `train` checks before its first step is checked here too: the whole data is read (a bad
    row anywhere fails) and the method's schedule is planned for the run's real length (an AdaLoRA
    or diff-pruning schedule that does not fit fails), so what validate accepts, train starts."""
    spec = RunSpec.from_config(cfg)
    resolve_device(spec.trainer.device)  # validate runs on the CPU, train where this names: refuse what is absent
    task = load_task(spec.task)
    full = dict(task.splits)
    n_train = len(task.splits["train"])
    task.splits = {name: rows[:8] for name, rows in task.splits.items()}
    backbone, method = build(spec, task)
    split = encode_splits(task, backbone, ["train"])["train"]
    method.attach(backbone, probe_batches(task, split, backbone, 4, spec.trainer.seed, torch.device("cpu")))
    steps_per_epoch, total_steps = spec.trainer.run_length(n_train)
    method.plan(total_steps, steps_per_epoch)
    batch = split.batch(list(range(len(split))))
    labels = batch.pop("labels")
    loss = task_loss(backbone.model(**batch).logits, labels, task.spec.is_regression)
    penalty = method.penalty()
    (loss if penalty is None else loss + penalty).backward()
    report = method.report()
    print(f"ok: task {task.name} ({task.spec.num_labels} outputs, metrics {', '.join(task.spec.metrics)}) · "
          f"model {backbone.name} · method {method.cfg.name}")
    print(report.line())
    print(f"one training batch of {len(split)} examples: loss {loss.item():.4f}")
    print(f"schedule: {total_steps:,} steps ({steps_per_epoch:,} per epoch of {n_train:,} training examples)")
    print(expected_cost(spec, task, method, backbone, full, total_steps, steps_per_epoch).line())


def expected_cost(spec: RunSpec, task: Task, method, backbone: Backbone, full: dict[str, list[Any]],
                  total_steps: int, steps_per_epoch: int):
    """The run's expected wall time (cost.py): the trainer's own steps timed per phase on a seeded sample of
    `trainer.batch_size` rows, one evaluation timed on a sample and scaled, setup as this process took it."""
    import time

    from selectune import cost

    setup_s = cost.process_age()
    real_switch = getattr(method, "switch_step", None)
    seed, eval_rows = spec.trainer.seed, 2 * spec.trainer.eval_batch_size
    sample = {"train": [full["train"][i] for i in cost.sample_rows(
        len(full["train"]), cost.timing_steps(method) * spec.trainer.batch_size, seed)]}
    for name in (n for n in full if n != "train"):
        sample[name] = [full[name][i] for i in cost.sample_rows(len(full[name]), min(len(full[name]), eval_rows), seed)]
    task.splits = sample
    t0 = time.perf_counter()
    splits = encode_splits(task, backbone, list(sample))
    setup_s += (time.perf_counter() - t0) * sum(map(len, full.values())) / sum(map(len, sample.values()))
    times, eval_s = cost.time_steps(spec, task, method, splits)
    phases, switch_s = cost.estimate(times, real_switch, total_steps)
    evaluated = [n for n in full if n != "train"]
    eval_s *= sum(len(full[n]) for n in evaluated) / sum(len(sample[n]) for n in evaluated)
    device = str(distributed.device_for(distributed.Context(), resolve_device(spec.trainer.device)))
    return cost.Estimate(setup_s, phases, switch_s, cost.evaluations(total_steps, spec.trainer.eval_every
                                                                     or steps_per_epoch), eval_s, device)
