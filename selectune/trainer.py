"""The training loop: one loop for every method (docs/design.md, "Flow of one run").

Read it top to bottom: set-up (optimiser, schedule, resume), then per step
    forward -> task loss + method.penalty() -> backward -> clip -> optimiser step -> method.after_step(t)
    -> zero_grad
with evaluation, logging and checkpoints at fixed step counts. A method changes what trains and what
is stored, never this file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from selectune import checkpoint
from selectune.distributed import Context, device_for
from selectune.errors import SelectuneError
from selectune.evaluation import evaluate, predict, prediction_counts, save_outputs
from selectune.methods.base import Method, ParamGroup
from selectune.tasks import Task
from selectune.tasks.batches import EncodedSplit, train_batches
from selectune.tb import open_sink

log = logging.getLogger(__name__)


@dataclass
class TrainerConfig:
    """The `trainer` config group."""

    epochs: float = 3.0
    max_steps: Optional[int] = None  # overrides epochs when set
    batch_size: int = 32
    grad_accum: int = 1  # split each batch into this many forward/backward passes (less memory, the same steps)
    eval_batch_size: int = 128
    lr: float = 2e-5  # for the method's parameters unless method.lr is set
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06  # linear warm-up over this share of the steps, then linear decay to 0
    max_grad_norm: float = 1.0
    eval_every: Optional[int] = None  # steps; None: at the end of every epoch (and always at the end)
    checkpoint_every: Optional[int] = None  # steps; None: at every evaluation
    checkpoint_minutes: Optional[float] = 10.0  # also a checkpoint once this long has passed since the last; null: off
    log_every: int = 10
    select: str = "last"  # which evaluation the stored delta and results come from: last | best
    patience: Optional[int] = None  # stop once this many evaluations in a row did not improve on the val split
    seed: int = 42
    resume: bool = False  # continue from the run directory's checkpoint (same hydra.run.dir / out_dir)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto | fp32 | bf16 | fp16 (torch.autocast; fp16 with a grad scaler). auto: bf16 where the device computes
    # it natively (CUDA with bf16, a CPU with AVX512-BF16 or AMX), else fp32. Method state stays fp32
    precision: str = "auto"
    group_by_length: bool = False  # text: batches of similar length (less padding), batch order still shuffled
    progress: bool = True  # the rich progress bar (stderr)
    tensorboard: bool = False  # also write metrics.jsonl's records as TensorBoard events (extra [tensorboard])

    def run_length(self, n_train: int) -> tuple[int, int]:
        """(steps per epoch, total steps) of a run on `n_train` examples: what the trainer plans with, and
        what `validate` reports before any training."""
        steps_per_epoch = math.ceil(n_train / self.batch_size)
        return steps_per_epoch, self.max_steps or max(1, math.ceil(self.epochs * steps_per_epoch))

    def validate(self) -> None:
        if self.select not in ("last", "best"):
            raise SelectuneError(f"trainer.select='{self.select}': use last or best")
        for key in ("batch_size", "eval_batch_size", "log_every", "grad_accum"):
            if getattr(self, key) <= 0:
                raise SelectuneError(f"trainer.{key} must be positive, got {getattr(self, key)}")
        for key in ("max_steps", "eval_every", "checkpoint_every"):  # None: the default; 0 would mean "never"
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise SelectuneError(f"trainer.{key} must be a positive number of steps, got {getattr(self, key)}")
        if self.grad_accum > self.batch_size:
            raise SelectuneError(f"trainer.grad_accum={self.grad_accum} splits each batch of trainer.batch_size="
                                 f"{self.batch_size} rows: it can be at most the batch size")
        if self.patience is not None and self.patience <= 0:
            raise SelectuneError(f"trainer.patience must be a positive number of evaluations, got {self.patience}")
        if self.checkpoint_minutes is not None and not self.checkpoint_minutes > 0:
            raise SelectuneError(f"trainer.checkpoint_minutes must be positive (or null for none), got "
                                 f"{self.checkpoint_minutes}")
        if not self.lr > 0:
            raise SelectuneError(f"trainer.lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise SelectuneError(f"trainer.weight_decay must be at least 0, got {self.weight_decay}")
        if self.max_steps is None and self.epochs <= 0:
            raise SelectuneError(f"trainer.epochs must be positive, got {self.epochs}")
        if self.precision not in (*PRECISIONS, "auto"):
            raise SelectuneError(f"trainer.precision='{self.precision}': use auto, {', '.join(PRECISIONS)}")
        if not 0 <= self.warmup_ratio < 1:
            raise SelectuneError(f"trainer.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` -> bf16 where the device computes it natively, else fp32; any other name as given.

    bf16 autocast keeps fp32 master weights and optimiser state (only matmul inputs are rounded), and needs
    no loss scaling: on a CPU with AVX512-BF16 a MiniLM step took 0.6x the fp32 time at matched quality
    (docs/benchmarks.md, docs/results.md). Without native support bf16 is emulated and slower, so auto
    falls back to fp32 there; fp16 is never chosen automatically (it needs a grad scaler and overflows)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_bf16_native() else "fp32"
    return "fp32"


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere torch emulates it, slower."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what `platform` knows where that file is absent."""
    model = platform.processor() or platform.machine() or "CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() or model
    return model


def machine_name(device: torch.device) -> str:
    """What timed the run, so a table can say when its s/step figures come from different machines: the GPU's
    name, or the CPU's model, whether it computes bf16 natively (what `precision=auto` reads) and the threads
    torch used. A run resumed elsewhere names the machine that finished it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    threads = torch.get_num_threads()
    return (f"{cpu_model()} ({'native bf16' if cpu_bf16_native() else 'no native bf16'}), "
            f"{threads} thread{'s' if threads != 1 else ''}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SelectuneError(f"trainer.device={name} but CUDA is not available here; use trainer.device=cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SelectuneError(f"trainer.device='{name}': use auto, cpu, cuda or cuda:N") from None


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    if labels.ndim == 2 and logits.ndim == 3:  # causal LM: token targets, IGNORE outside the answers
        from selectune.tasks.causal import LMSplit

        return LMSplit.loss(logits, labels)
    if regression:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def lr_multiplier(step: int, start: int, end: int, warmup_ratio: float) -> float:
    """Linear warm-up over `warmup_ratio` of the window [start, end), then linear decay to 0 at `end`;
    0 before the window. Shared with the peft parity harness so both sides follow one schedule."""
    if step < start:
        return 0.0
    warmup = int(warmup_ratio * (end - start))
    if step < start + warmup:
        return (step - start + 1) / warmup
    return max(0.0, (end - step) / max(1, end - start - warmup))


def adamw(groups: list[dict[str, Any]], lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the fewest kernels per step the device offers: fused (one kernel per group and dtype) on
    CUDA and CPU, foreach (a handful of multi-tensor kernels) elsewhere, never the per-tensor loop whose
    launches dominate a GPU step that trains many small tensors (SparseDelta values, AdaLoRA triplets, gates).
    On a 2-core CPU one fused step over MiniLM's 22.7M parameters took 14-18 ms, foreach 87-99 ms and the
    loop 116-135 ms (`python scripts/bench/bench_adamw.py`, 3 rounds)."""
    if device.type in ("cuda", "cpu"):
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    return torch.optim.AdamW(groups, lr=lr, foreach=True)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA peak allocation on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LossWatch:
    """The training loss summed over a logging window, and the first step whose total loss (task +
    penalty) was not finite, both kept on the device: reading either on the host waits for the device
    to finish the step, so the loop reads them only at log_every (and before evaluating or saving), not
    every step. A non-finite loss is still reported with its value and step, at most log_every - 1 steps
    late, and never reaches a checkpoint or a stored delta."""

    def __init__(self, device: torch.device) -> None:
        acc = torch.float32 if device.type == "mps" else torch.float64  # the host sum was a Python float
        self.loss_sum = torch.zeros((), dtype=acc, device=device)
        self.bad_step = torch.zeros((), dtype=torch.long, device=device)  # 0: every loss finite so far
        self.bad_value = torch.zeros((), dtype=torch.float32, device=device)

    def add(self, loss: torch.Tensor, total: torch.Tensor, rows: int, step: int) -> None:
        self.loss_sum += loss.detach().to(self.loss_sum.dtype) * rows
        first = ~torch.isfinite(total.detach()) & (self.bad_step == 0)
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_value = torch.where(first, total.detach().float(), self.bad_value)

    def check(self, lr: float) -> None:
        """Raise if a loss of the run was not finite (one host read)."""
        step = int(self.bad_step)
        if step:
            raise SelectuneError(f"loss became {float(self.bad_value)} at step {step}; lower trainer.lr "
                                 f"(now {lr}) or method.lr")

    def take(self) -> float:
        """The window's summed loss (one host read), and a new window."""
        value = float(self.loss_sum)
        self.loss_sum.zero_()
        return value


@dataclass
class RunState:
    """What changes as a run goes: the step, the optimiser built for what trains now, the evaluations, the
    chosen one. A checkpoint saves it (with the weights and the method's state); a resume rebuilds it."""

    watch: LossWatch
    step: int = 0
    evals: list[dict[str, Any]] = field(default_factory=list)
    best: Optional[dict[str, Any]] = None
    delta_bytes: Optional[int] = None
    train_time: float = 0.0
    eval_time: float = 0.0  # seconds in evaluations: the rest of a run's cost (a 10,000-image test split is minutes)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Optional[torch.optim.lr_scheduler.LambdaLR] = None
    scaler: Optional[torch.amp.GradScaler] = None
    forward_model: Optional[torch.nn.Module] = None
    built_for: int = -1  # the method's trainable_version the optimiser was built for
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # the last evaluation's predictions
    bar: Optional[TaskID] = None  # the progress bar's line
    window_n: int = 0  # rows trained since the last metrics record
    window_extra: dict[str, Any] = field(default_factory=dict)  # what after_step reported since then (latest each)
    window_t0: float = 0.0
    stopped_at: Optional[int] = None  # the step on_eval ended the run at
    resumed: bool = False  # the state came from a checkpoint
    phase_time: dict[str, list[float]] = field(default_factory=dict)  # phase -> [seconds, steps] (s/step by phase)
    stopped_early: Optional[int] = None  # the step trainer.patience stopped the run at
    session_t0: float = 0.0  # when this process started training (elapsed and ETA in the log lines)
    session_step: int = 0  # the step it started at
    saved_at: float = 0.0  # when the last checkpoint was written (trainer.checkpoint_minutes)


class Trainer:
    def __init__(self, cfg: TrainerConfig, task: Task, method: Method, splits: dict[str, EncodedSplit],
                 run_dir: Path, save_delta, console: Console | None = None,
                 ctx: Context = Context(),  # noqa: B008 (a frozen, immutable default)
                 on_eval: Callable[[int, float], bool] | None = None) -> None:
        """`save_delta(path)` writes the method's current TaskDelta and returns its size in bytes.
        `on_eval(step, score)` is called after every evaluation of the delta's final form (`method.storable`:
        not during diff pruning's phase 1, nor before AdaLoRA's final mask) with the primary metric on the
        selection split; returning True ends the run there (a sweep pruning a hopeless candidate), as if it had
        reached its last step: the delta and results are written as usual, with `stopped_at`. A resumed run first
        tells it the evaluations its checkpoint kept, in order (their answers are not acted on)."""
        cfg.validate()
        if ctx.active and cfg.batch_size < ctx.world:
            raise SelectuneError(f"trainer.batch_size={cfg.batch_size} is the global batch: it must be at least the "
                                 f"{ctx.world} processes")
        self.cfg, self.task, self.method, self.splits = cfg, task, method, splits
        self.run_dir, self.save_delta, self.ctx = run_dir, save_delta, ctx
        self.console = console or Console(stderr=True)
        self.device = device_for(ctx, resolve_device(cfg.device))
        self.precision = resolve_precision(cfg.precision, self.device)
        self.on_eval = on_eval
        self._batches: tuple[int, list[list[int]]] = (-1, [])
        dtype = PRECISIONS[self.precision]
        self.autocast = lambda: torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)
        # the method may train on other splits (the cached probe's features) with another model (its head)
        self.splits = splits = method.prepare(splits, cfg.eval_batch_size, self.device)
        self.model = method.model.to(self.device)
        self.eval_splits = {name: splits[name] for name in task.eval_splits}
        n_train = len(splits["train"])
        self.steps_per_epoch, self.total_steps = cfg.run_length(n_train)
        self.eval_every = cfg.eval_every or self.steps_per_epoch
        method.plan(self.total_steps, self.steps_per_epoch)  # schedules are validated before any step
        self.checkpoint_every = cfg.checkpoint_every or self.eval_every
        if cfg.patience is not None and task.select_split != "val":
            raise SelectuneError("trainer.patience stops on the validation split, and this run has none: add "
                                 "task.validation=0.1 (a share of the training file), so dev is never chosen on")
        self.sink = open_sink(run_dir, cfg.tensorboard and ctx.main)

    # ------------------------------------------------------------------ helpers
    def _multiplier(self, group: ParamGroup, step: int) -> float:
        """Learning-rate factor of one parameter group at `step`: linear warm-up then linear decay to 0
        over the group's window (default: the whole run), or 1 for groups marked `constant`."""
        if group.constant:
            return 1.0
        return lr_multiplier(step, *(group.window or (0, self.total_steps)), self.cfg.warmup_ratio)

    def _optimizer(self, step: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW over the method's parameter groups, each group's schedule positioned at `step`."""
        groups = self.method.param_groups(self.cfg.lr, self.cfg.weight_decay)
        typed = [ParamGroup.of(group, self.method.cfg.name) for group in groups]  # a misspelt key fails here
        optimizer = adamw(groups, self.cfg.lr, self.device)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]  # lets the schedule start at `step` (last_epoch below)
        lambdas = [lambda s, g=group: self._multiplier(g, s) for group in typed]
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas, last_epoch=step - 1)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch on the training device. On CUDA from pinned memory without blocking: a plain copy from
        pageable memory waits for the device to drain its queue, i.e. a host sync every step."""
        if self.device.type != "cuda":
            return {k: v.to(self.device) for k, v in batch.items()}
        return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}

    def _clip(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip gradients to max_grad_norm, separately per `clip` family of groups (default: all together)."""
        families: dict[str, list[torch.Tensor]] = {}
        for group in optimizer.param_groups:
            families.setdefault(group.get("clip", "all"), []).extend(group["params"])
        for params in families.values():
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)

    def _forward_model(self) -> torch.nn.Module:
        """The model the loop calls: DDP around it when several processes train (re-made whenever the
        method changes what trains; DDP broadcasts rank 0's parameters and buffers as it wraps)."""
        if not self.ctx.active:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # an empty trainable tensor (a matrix SaRA selected nothing from) never gets a gradient
        unused = any(p.numel() == 0 for p in self.method.trainable().values())
        return DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=unused)

    def _evaluate(self) -> tuple[dict[str, dict[str, float | None]], dict[str, Any]]:
        """Dev metrics; with several processes each predicts its share of the rows, gathered in order. Always in
        fp32, outside the training autocast: the scores are those of the stored fp32 delta, as `selectune eval`
        and an exported model compute them, whatever precision trained it."""
        cfg = self.cfg
        if not self.ctx.active:
            return evaluate(self.model, self.task, self.eval_splits, cfg.eval_batch_size, self.device)
        outputs = {}
        for name, split in self.eval_splits.items():
            rows = self.ctx.shard(list(range(len(split))))
            part = predict(self.model, split.subset(rows), cfg.eval_batch_size, self.device)
            full = np.empty((len(split), part.shape[-1]), dtype=part.dtype)
            for r, chunk in enumerate(self.ctx.gather(part)):
                full[r::self.ctx.world] = chunk
            outputs[name] = full
        metrics = {name: self.task.score(outputs[name], split.labels.numpy())
                   for name, split in self.eval_splits.items()}
        return metrics, outputs

    def _write_jsonl(self, record: dict[str, Any]) -> None:
        if not self.ctx.main:
            return
        with (self.run_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.sink is not None:
            self.sink.write(record)

    def _truncate_jsonl(self, step: int) -> None:
        """On resume, drop the records a killed run wrote after its last checkpoint."""
        if not self.ctx.main:
            return
        if self.sink is not None:
            self.sink.resume_at(step)
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text(errors="replace").splitlines() if _record_step(line) <= step]
            path.write_text("".join(line + "\n" for line in kept))

    def _primary(self, metrics: dict[str, dict[str, float | None]]) -> float:
        value = metrics[self.task.select_split][self.task.spec.primary]
        if value is None:
            return -math.inf
        return -value if getattr(self.task.spec, "lower_is_better", False) else value  # perplexity

    # ------------------------------------------------------------------ the loop
    def fit(self, proceed: Optional[Callable[[], None]] = None) -> dict[str, Any]:
        """Train to `total_steps` (from the checkpoint when resuming), evaluating, logging and saving at their
        step counts, then store the chosen delta. Every method runs these same steps. `proceed` is called once
        the checkpoint has been read and checked, before the loop writes anything: a refused resume (a damaged
        or foreign checkpoint) leaves the run folder as it was."""
        run = self._restore()
        if proceed is not None:
            proceed()
        self._resumed(run)
        self.model.train()
        with self._progress(run) as progress:
            while run.step < self.total_steps:
                extra, penalty, rows = self._step(run)
                run.window_n += rows
                run.window_extra.update(extra)  # a one-off report (diff pruning's projection) waits for the record
                step = run.step
                if (step % self.cfg.log_every == 0 or step == self.total_steps or step % self.eval_every == 0
                        or step % self.checkpoint_every == 0):  # nothing non-finite is evaluated or saved
                    run.watch.check(self.cfg.lr)
                if step % self.cfg.log_every == 0 or step == self.total_steps:
                    self._log_window(run, penalty, progress)
                progress.update(run.bar, completed=step)
                if step % self.eval_every == 0 or step == self.total_steps:
                    self._evaluate_and_select(run, progress)
                    # only evaluations of the delta's final form count (diff pruning's phase 1 is not one, nor
                    # AdaLoRA over its final budget): a sweep prunes on the scores select=best chooses among
                    if (self.on_eval is not None and self.method.storable
                            and self.on_eval(step, self._primary(run.evals[-1]["metrics"]))
                            and step < self.total_steps):
                        run.stopped_at = step
                        break
                    if self._stale(run):
                        if self.ctx.main:
                            stop = (f"early stop at step {step}: no better {self.task.select_split} "
                                    f"{self.task.spec.primary} in {self.cfg.patience} evaluations (trainer.patience)")
                            progress.console.print(stop, soft_wrap=True)
                        run.stopped_early = step
                        break
                if step < self.total_steps and self.ctx.main and (step % self.checkpoint_every == 0
                                                                  or self._checkpoint_due(run)):
                    self._checkpoint(run)
        return self._finish(run)

    def _stale(self, run: RunState) -> bool:
        """Whether the last trainer.patience evaluations all failed to beat the best one before them. Only
        evaluations of a storable delta count (as for select=best): diff pruning's phase 1 or AdaLoRA's warm-up
        cannot stop a run that has nothing to store yet, nor set the score its final form must beat."""
        patience = self.cfg.patience
        scores = [self._primary(e["metrics"]) for e in run.evals if e.get("storable", True)]
        if patience is None or len(scores) <= patience:
            return False
        return max(scores[-patience:]) <= max(scores[:-patience])

    def _checkpoint_due(self, run: RunState) -> bool:
        """Whether trainer.checkpoint_minutes have passed since the last checkpoint (or the start): a long epoch
        (8,419 steps on SST-2) is never all lost to a kill."""
        minutes = self.cfg.checkpoint_minutes
        return minutes is not None and time.perf_counter() - run.saved_at >= 60 * minutes

    def _phase(self) -> str:
        """The method's phase as the bar and the log show it (diff pruning: 1 or 2); "" for one-phase methods."""
        phase = getattr(self.method, "phase", None)
        return "" if phase is None else str(phase)

    def _restore(self) -> RunState:
        """A fresh run, or the one the checkpoint in run_dir left (weights, optimiser, schedule, RNG, data
        position, evaluations so far); metrics.jsonl is cut back to the checkpoint's step."""
        cfg, method = self.cfg, self.method
        # a checkpoint/ folder without its state.pt is a damaged checkpoint, not a run to start over
        state = checkpoint.read(self.run_dir) if cfg.resume and (self.run_dir / checkpoint.NAME).exists() else None
        if state is not None and state["step"] >= self.total_steps:  # checkpoints are written before the last step
            raise checkpoint.damaged(self.run_dir, f"its step {state['step']} is not below this run's "
                                                   f"{self.total_steps} steps")
        run = RunState(watch=LossWatch(self.device))
        if state is not None:
            method.load_state(state["method"])  # first: it may redefine what trains (re-selected masks)
            run.step, run.evals, run.best, run.delta_bytes, run.train_time = (
                state["step"], state["evals"], state["best"], state["delta_bytes"], state["train_time"])
            run.eval_time = float(state.get("eval_time", 0.0))  # absent in checkpoints written before it existed
            kept = state.get("phase_time")  # likewise
            run.phase_time = ({str(k): [float(v[0]), int(v[1])] for k, v in kept.items()}
                              if isinstance(kept, dict) else {})
        self._build_optimizer(run)
        run.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if state is not None:
            checkpoint.restore(self.run_dir, run.params, state)
            checkpoint.load_loop_states(self.run_dir, state, optimizer=run.optimizer, scheduler=run.scheduler,
                                        scaler=run.scaler)
            run.resumed = True
        return run

    def _resumed(self, run: RunState) -> None:
        """The records of a resumed run cut back to its checkpoint (written only once the run proceeds)."""
        if run.resumed:
            self._truncate_jsonl(run.step)
            if self.ctx.main:
                self.console.print(f"resumed from step {run.step}/{self.total_steps} "
                                   f"({self.run_dir / checkpoint.NAME})")
            if self.on_eval is not None:
                # the evaluations before the kill, told again in order: a sweep's new trial for this candidate
                # then numbers the next one as the run's k-th, as the pruner compares it with other candidates'
                # k-th (only a pruning decision at a new evaluation stops the run)
                for record in run.evals:
                    if record.get("storable", True):
                        self.on_eval(record["step"], self._primary(record["metrics"]))
        elif self.cfg.resume:
            self._truncate_jsonl(-1)  # a run killed before its first checkpoint: its records start over too
            if self.ctx.main:
                self.console.print(f"no checkpoint in {self.run_dir}: starting at step 0")

    def _build_optimizer(self, run: RunState) -> None:
        """Optimiser, schedule and (DDP) forward model for what the method trains now, at run.step."""
        run.params = self.method.trainable()
        run.optimizer, run.scheduler = self._optimizer(run.step)
        run.forward_model = self._forward_model()
        run.built_for = self.method.trainable_version

    def _progress(self, run: RunState) -> Progress:
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                            console=self.console, disable=not (self.cfg.progress and self.ctx.main),
                            transient=False)
        # the stats stay empty until the first logging window has a loss and a speed to show
        run.bar = progress.add_task(self._bar_title(), total=self.total_steps, completed=run.step, stats="")
        run.window_t0 = run.session_t0 = run.saved_at = time.perf_counter()
        run.session_step = run.step
        return progress

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of `epoch` (made once per epoch): shuffled, or grouped by length (trainer.group_by_length)."""
        if self._batches[0] != epoch:
            train = self.splits["train"]
            lengths = train.lengths() if self.cfg.group_by_length else None
            self._batches = (epoch, train_batches(len(train), self.cfg.batch_size, self.cfg.seed, epoch, lengths))
        return self._batches[1]

    def _bar_title(self) -> str:
        phase = self._phase()
        return f"{self.task.name} · {self.method.cfg.name}" + (f" · phase {phase}" if phase else "")

    def _step(self, run: RunState) -> tuple[dict[str, Any], Optional[torch.Tensor], int]:
        """One optimiser step on the next batch: forward, task loss + method.penalty(), backward, clip, step,
        method.after_step. Returns what after_step logged, the penalty and this process's row count."""
        cfg, method, train = self.cfg, self.method, self.splits["train"]
        t0 = time.perf_counter()
        phase = self._phase() or "train"
        epoch, offset = divmod(run.step, self.steps_per_epoch)
        global_rows = self._epoch_batches(epoch)[offset]
        rows = self.ctx.shard(global_rows)
        parts = [part.tolist() for part in np.array_split(np.array(rows, dtype=np.int64), cfg.grad_accum)
                 if len(part)]  # trainer.grad_accum: the same batch in several passes, gradients summed
        penalty = None
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            batch = self._to_device(train.batch(part))
            labels = batch.pop("labels")
            # DDP syncs gradients on the last pass only
            sync = contextlib.nullcontext() if last or not self.ctx.active else run.forward_model.no_sync()
            with sync:
                with self.autocast():
                    loss = task_loss(run.forward_model(**batch).logits, labels, self.task.spec.is_regression)
                # DDP averages gradients over ranks: weigh each pass's mean by its share of the global batch
                share = len(part) * self.ctx.world / len(global_rows)
                total = loss * share
                if last:
                    penalty = method.penalty()  # outside autocast: method state (α, importance...) stays fp32
                    total = total if penalty is None else total + penalty
                run.watch.add(loss, total, len(part), run.step + 1)  # on the device: read back at log_every
                run.scaler.scale(total).backward()
        run.scaler.unscale_(run.optimizer)
        if cfg.max_grad_norm > 0:
            self._clip(run.optimizer)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        run.step += 1
        extra = method.after_step(run.step)  # before zero_grad: AdaLoRA's importance reads the gradients
        run.optimizer.zero_grad(set_to_none=True)
        if method.trainable_version != run.built_for:  # the method changed what trains (re-selection)
            self._build_optimizer(run)
        took = time.perf_counter() - t0
        run.train_time += took
        spent = run.phase_time.setdefault(phase, [0.0, 0])
        spent[0] += took
        spent[1] += 1
        return extra, penalty, len(rows)

    def _log_window(self, run: RunState, penalty: Optional[torch.Tensor], progress: Progress) -> None:
        """One metrics.jsonl record for the steps since the last one (their mean loss: one host read)."""
        elapsed = time.perf_counter() - run.window_t0
        window_loss, window_n = self.ctx.sum(run.watch.take()), self.ctx.sum(run.window_n)
        record = {"step": run.step, "epoch": round(run.step / self.steps_per_epoch, 4),
                  "loss": window_loss / window_n, "lr": run.scheduler.get_last_lr()[0],
                  "examples_per_s": window_n / elapsed,
                  "peak_memory_mb": round(peak_memory_mb(self.device), 1), **run.window_extra}
        if penalty is not None:
            record["penalty"] = penalty.item()
        self._write_jsonl(record)
        stats = f"loss {record['loss']:.4f} · lr {record['lr']:.2e} · {record['examples_per_s']:.1f} ex/s"
        log.info("step %d/%d · %s", run.step, self.total_steps, stats)
        progress.update(run.bar, stats=stats, description=self._bar_title())
        if self.cfg.progress and self.ctx.main and not self.console.is_terminal:  # a log file gets plain lines
            elapsed = time.perf_counter() - run.session_t0
            done = run.step - run.session_step
            eta = elapsed / max(done, 1) * (self.total_steps - run.step)
            phase = self._phase()
            self.console.print(f"step {run.step}/{self.total_steps}" + (f" · phase {phase}" if phase else "")
                               + f" · {stats} · elapsed {duration(elapsed)} · ETA {duration(eta)}", soft_wrap=True)
        run.window_n, run.window_t0 = 0, time.perf_counter()
        run.window_extra.clear()

    def _evaluate_and_select(self, run: RunState, progress: Progress) -> None:
        """Score the eval splits; with select=best, store the delta when the selection split improved."""
        t0 = time.perf_counter()
        metrics, run.outputs = self._evaluate()
        run.eval_time += time.perf_counter() - t0
        record: dict[str, Any] = {"step": run.step, "metrics": metrics}
        if not self.method.storable:  # diff pruning's phase 1, AdaLoRA before its final mask: on_eval never saw it
            record["storable"] = False
        counts = prediction_counts(self.task, run.outputs)
        if counts is not None:  # rows per predicted label: a collapse shows
            record["predictions"] = counts
        run.evals.append(record)
        self._write_jsonl({"step": run.step, "eval": metrics})
        if self.ctx.main:
            progress.console.print(f"step {run.step}: " + format_metrics(metrics))
            log.info("step %d: %s", run.step, format_metrics(metrics))
        improved = run.best is None or self._primary(metrics) > self._primary(run.best["metrics"])
        if self.cfg.select == "best" and self.method.storable and improved:
            run.best = dict(record)
            if self.ctx.main:
                run.delta_bytes = self.save_delta(self.run_dir / "delta.safetensors")
                save_outputs(self.run_dir, run.outputs)

    def _checkpoint(self, run: RunState) -> None:
        checkpoint.save(self.run_dir, run.params, {
            "step": run.step, "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(), "method": self.method.state(), "evals": run.evals,
            "best": run.best, "delta_bytes": run.delta_bytes, "train_time": run.train_time,
            "eval_time": run.eval_time, "phase_time": run.phase_time})
        run.saved_at = time.perf_counter()

    def _finish(self, run: RunState) -> dict[str, Any]:
        """Store the delta (select=last), the method's artifacts, drop the checkpoint; the run's results."""
        cfg, main = self.cfg, self.ctx.main
        if cfg.select == "last" and main:
            run.delta_bytes = self.save_delta(self.run_dir / "delta.safetensors")
            save_outputs(self.run_dir, run.outputs)
        if main:
            self.method.write_artifacts(self.run_dir)
        if self.sink is not None:
            self.sink.close()
        if run.best is None and cfg.select == "best":
            raise SelectuneError("trainer.select=best found no evaluation of a storable delta; evaluate after "
                                 "the method's final form exists (trainer.eval_every) or use select=last")
        chosen = run.evals[-1] if cfg.select == "last" else run.best
        if main:
            checkpoint.remove(self.run_dir)
        distributed = {"world": self.ctx.world, "in_sync": self.ctx.in_sync(self.model)} if self.ctx.active else None
        return {"selection": cfg.select, "selected_on": self.task.select_split, "primary": self.task.spec.primary,
                "selected_step": chosen["step"], "metrics": chosen["metrics"],
                "predictions": chosen.get("predictions"),
                "final": run.evals[-1], "evals": run.evals, "steps": run.step, "delta_bytes": run.delta_bytes,
                "train_time_s": round(run.train_time, 2), "step_time_s": round(run.train_time / max(run.step, 1), 4),
                "eval_time_s": round(run.eval_time, 2), "stopped_early": run.stopped_early,
                "step_time_s_by_phase": {phase: round(seconds / max(steps, 1), 4)
                                         for phase, (seconds, steps) in run.phase_time.items()},
                "peak_memory_mb": round(peak_memory_mb(self.device), 1), "device": str(self.device),
                "machine": machine_name(self.device), "precision": self.precision, "stopped_at": run.stopped_at,
                "distributed": distributed}

def _record_step(line: str) -> float:
    """A metrics.jsonl record's step; a line a full disk or a kill cut short (not JSON, or no step) counts as
    after every checkpoint, so a resume drops it."""
    try:
        record = json.loads(line)
    except ValueError:
        return math.inf
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else math.inf


def duration(seconds: float) -> str:
    """`7.4 s`, `12 min 5 s`, `14 h 3 min`: as precise as a person reads it."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def format_metrics(metrics: dict[str, dict[str, float | None]]) -> str:
    parts = []
    for split, values in metrics.items():
        shown = " ".join(f"{k} {'n/a' if v is None else f'{v:.2f}'}" for k, v in values.items())
        parts.append(f"{split}: {shown}")
    return " · ".join(parts)
