"""What each subcommand does, given a composed config: recipe -> task -> backbone -> method -> trainer
-> delta. The CLI (cli.py) only parses arguments and reports errors; the work is here."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape

from selectune import __version__, distributed, runfs
from selectune.backbone import Backbone, load_backbone
from selectune.errors import SelectuneError
from selectune.methods.base import ProbeBatches
from selectune.runspec import RunSpec
from selectune.tasks import Task, load_task
from selectune.tasks.batches import EncodedSplit, train_batches
from selectune.trainer import Trainer, format_metrics, resolve_device, task_loss

log = logging.getLogger(__name__)
console = Console(stderr=True)
RUN_OUTPUTS = ("metrics.jsonl", "checkpoint", "results.json", "delta.safetensors")


def build(spec: RunSpec, task: Task):
    """Backbone with the task's head, and the method attached to it."""
    from selectune.methods import build_method

    labels = task.spec.labels if not task.spec.is_regression else None
    backbone = load_backbone(spec.model, task.spec.num_labels, task.spec.is_regression, labels,
                             spec.trainer.seed)
    method = build_method(spec.method, spec.budget.resolve(backbone.num_base_parameters))
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
          owned: bool = False) -> dict[str, Any]:
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
        return _train(cfg, spec, ctx, run_dir, stage if ctx.main else None)
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
           stage: Path | None) -> dict[str, Any]:
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
    if ctx.main:
        # escaped: rich would take the backbone's `[random init: ...]` label for markup and drop it
        console.print(f"[bold]{escape(task.name)}[/] · " + escape(
                      f"{method.cfg.name} · {backbone.name} · {len(splits['train']):,} train examples · {report.line()}"
                      + (f" · {json.dumps(decided)}" if decided else "")
                      + (f" · {ctx.world} processes" if ctx.active else "")))
        log.info("%s %s", report.line(), decided)
        if stage is not None:  # the run proceeds: what Hydra wrote moves in
            runfs.adopt_staging(stage, run_dir)
        runfs.write_text(saved_cfg, OmegaConf.to_yaml(OmegaConf.create(resolved)), run_dir)

    meta = {"base_model": backbone.name, "base_hash": base_hash, "method": method.cfg.name, "task": task.name,
            "budget": report.as_dict(), "seed": spec.trainer.seed, "selectune_version": __version__,
            "config": resolved}

    def save_delta(path: Path) -> int:
        from selectune.delta.taskdelta import TaskDelta

        return TaskDelta(method.delta(), {**meta, "method_state": method.describe()}).save(path, cfg.get("compact"))

    trainer = Trainer(spec.trainer, task, method, splits, run_dir, save_delta, console, ctx)
    outcome = trainer.fit()
    results = {"task": task.name, "family": spec.task.family, "method": method.cfg.name, "model": backbone.name,
               "seed": spec.trainer.seed, **outcome, "budget": method.report().as_dict(),
               "method_state": method.describe(), "base_hash": base_hash, "selectune_version": __version__}
    if not ctx.main:
        return results
    runfs.write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n", run_dir)
    console.print(f"[bold green]done[/] · {results['selection']} (step {results['selected_step']}): "
                  f"{format_metrics(results['metrics'])} · delta {results['delta_bytes']:,} bytes · {run_dir}")
    return results


def _comparable(config: Any) -> Any:
    """A run's config minus what may change between a start and its resume."""
    config = json.loads(json.dumps(config))
    config.get("trainer", {}).pop("resume", None)
    config.get("trainer", {}).pop("progress", None)
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
def evaluate_delta(run: str, task_node: DictConfig | None, batch_size: int, device: str) -> dict[str, Any]:
    """Evaluate a stored TaskDelta on a task's dev split(s) (the task it was trained on by default)."""
    from selectune.delta.taskdelta import TaskDelta
    from selectune.evaluation import evaluate

    path = Path(run)
    delta = TaskDelta.load(path)
    cfg = OmegaConf.create(delta.meta["config"])
    if task_node is not None:
        cfg.task = task_node
    spec = RunSpec.from_config(cfg)
    task = load_task(spec.task)
    backbone, _ = build(spec, task)
    if backbone.base_hash() != delta.meta["base_hash"]:
        raise SelectuneError(f"the base weights of '{backbone.name}' differ from those the delta was trained on "
                             f"(hash {backbone.base_hash()} != {delta.meta['base_hash']})")
    delta.apply_to(backbone.model)
    target = resolve_device(device)
    backbone.model.to(target)
    splits = encode_splits(task, backbone, task.eval_splits)
    metrics, _ = evaluate(backbone.model, task, splits, batch_size, target)
    result = {"run": str(path), "task": task.name, "method": delta.meta["method"], "metrics": metrics}
    out_dir = path if path.is_dir() else path.parent
    runfs.write_text(out_dir / f"eval_{task.name}.json", json.dumps(result, indent=2) + "\n", out_dir)
    print(f"{task.name} · {delta.meta['method']} · {format_metrics(metrics)}")
    return result


# --------------------------------------------------------------------------- validate / ls / cat
def validate(cfg: DictConfig) -> None:
    """Compose, build task + model + method on a few examples, run one forward/backward, print the budget.

    Everything `train` checks before its first step is checked here too: the whole data is read (a bad
    row anywhere fails) and the method's schedule is planned for the run's real length (an AdaLoRA
    or diff-pruning schedule that does not fit fails), so what validate accepts, train starts."""
    spec = RunSpec.from_config(cfg)
    task = load_task(spec.task)
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
