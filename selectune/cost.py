"""What a run will cost before it starts: `selectune validate` times real training steps and prints the
expected wall time of the whole run.

The steps are the training loop's own (`Trainer._step`: forward, loss + penalty, backward, clip, optimiser,
after_step) on `trainer.batch_size` rows drawn with a fixed seed from the whole training split, so padding
is representative; a method with two phases (diff pruning) is switched to its second phase after a few steps,
and each phase is timed on its own, the projection between them too. Evaluation is timed on up to two eval
batches of each eval split and scaled to the splits' sizes and the run's evaluations; setup (reading and
tokenising the data, building the model, the method's own probe) is what validate itself took, with the
tokenising scaled from the rows validate encoded to the rows a run encodes.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from selectune.trainer import duration  # the loop's log lines use it too; the loop is below this module

WARM, TIMED = 1, 4  # steps per phase: one to warm up (allocations, first-call overheads), then timed


@dataclass
class Estimate:
    """The expected wall time of a run, by part."""

    setup_s: float
    phases: list[tuple[str, int, float]] = field(default_factory=list)  # (name, steps, s/step)
    switch_s: float = 0.0  # one-offs: each phase's first steps' extra cost, diff pruning's projection
    evals: int = 0
    eval_s: float = 0.0  # one evaluation of every eval split
    device: str = "cpu"

    @property
    def total_s(self) -> float:
        return (self.setup_s + sum(n * s for _, n, s in self.phases) + self.switch_s + self.evals * self.eval_s)

    def line(self) -> str:
        parts = [f"setup {duration(self.setup_s)}"]
        parts += [f"{name} {n:,} steps × {s:.3f} s" for name, n, s in self.phases]
        if self.switch_s:
            parts.append(f"first steps{' and projection' if len(self.phases) > 1 else ''} {duration(self.switch_s)}")
        parts.append(f"{self.evals} evaluations × {duration(self.eval_s)}")
        return f"expected wall time: {duration(self.total_s)} on {self.device} ({' + '.join(parts)})"

    def as_dict(self) -> dict[str, Any]:
        return {"total_s": round(self.total_s, 1), "setup_s": round(self.setup_s, 2),
                "phases": [{"name": n, "steps": k, "s_per_step": round(s, 4)} for n, k, s in self.phases],
                "switch_s": round(self.switch_s, 2), "evals": self.evals, "eval_s": round(self.eval_s, 2)}


def sample_rows(n: int, k: int, seed: int) -> list[int]:
    """k row indices of n (with repeats when n < k), fixed by the seed: a representative sample of lengths."""
    rng = random.Random(seed)
    return rng.sample(range(n), k) if k <= n else [rng.randrange(n) for _ in range(k)]


def time_steps(spec: Any, task: Any, method: Any, splits: dict[str, Any]) -> tuple[list[float], float]:
    """Seconds of each training step the trainer takes on `splits` (a timing sample of the real splits: as many
    batches as `timing_steps`), and of one evaluation of its eval splits. The method's schedule stays the one
    planned for the real run (validate planned it); a two-phase method switches after its first WARM + TIMED
    steps, so the second half of the steps are phase 2's."""
    from selectune.trainer import Trainer

    steps = len(splits["train"]) // spec.trainer.batch_size
    cfg = dataclasses.replace(spec.trainer, max_steps=steps, epochs=1.0, progress=False, tensorboard=False,
                              resume=False, eval_every=None, checkpoint_every=None)
    method.plan = lambda total_steps, steps_per_epoch: None  # keep the real run's plan (an instance override)
    try:
        with tempfile.TemporaryDirectory(prefix="selectune-cost-") as folder:
            trainer = Trainer(cfg, task, method, splits, Path(folder), lambda path: 0)
            if phased(method):
                method.switch_step = WARM + TIMED
            run = trainer._restore()
            trainer.model.train()
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                trainer._step(run)
                _sync(trainer.device)
                times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            trainer._evaluate()
            _sync(trainer.device)
            return times, time.perf_counter() - t0
    finally:
        del method.plan


def phased(method: Any) -> bool:
    """A method whose run has two phases at `switch_step` (diff pruning)."""
    return hasattr(method, "switch_step")


def estimate(times: list[float], real_switch: int | None, total_steps: int) -> tuple[list[tuple[str, int, float]],
                                                                                     float]:
    """Per phase (name, the real run's steps, s/step) and the one-off seconds (first steps, the switch), from
    `time_steps`."""
    if real_switch is None:
        steady = _mean(times[WARM:])
        return [("train", total_steps, steady)], max(0.0, sum(times[:WARM]) - WARM * steady)
    per_phase = WARM + TIMED
    first, second = times[WARM:per_phase - 1], times[per_phase + WARM:]
    one_off = max(0.0, times[per_phase - 1] - _mean(first))  # the switching step also projected
    # each phase's first steps cost more once (allocations, first calls): a short run feels it
    one_off += max(0.0, sum(times[:WARM]) - WARM * _mean(first))
    one_off += max(0.0, sum(times[per_phase:per_phase + WARM]) - WARM * _mean(second))
    return [("phase 1", real_switch, _mean(first)), ("phase 2", total_steps - real_switch, _mean(second))], one_off


def process_age() -> float:
    """Seconds since this process started (its imports included), from /proc; 0 where there is none."""
    import os

    try:
        start_ticks = float(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timing_steps(method: Any) -> int:
    """Steps the timing sample needs: one phase's worth, twice for a two-phase method."""
    return (WARM + TIMED) * (2 if phased(method) else 1)


def evaluations(total_steps: int, eval_every: int) -> int:
    """How many evaluations a run of `total_steps` makes (every `eval_every` steps and always at the end)."""
    return total_steps // eval_every + (0 if total_steps % eval_every == 0 else 1)


