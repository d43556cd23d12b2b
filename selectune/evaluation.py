"""Scoring a model on a task's dev split(s): shared by the training loop and `selectune eval`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from selectune.errors import SelectuneError
from selectune.tasks import Task
from selectune.tasks.batches import EncodedSplit, eval_batches


@torch.inference_mode()
def predict(model: nn.Module, split: EncodedSplit, batch_size: int, device: torch.device) -> np.ndarray:
    """Raw outputs (logits; for a causal-LM split what it makes of them) for every row of `split`, in row order."""
    was_training = model.training
    model.eval()
    outputs: list[tuple[list[int], torch.Tensor]] = []
    for rows in eval_batches(split, batch_size):
        batch = split.batch(rows)
        labels = batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        if hasattr(split, "outputs"):  # a causal-LM split: label-word scores or answer NLL, from its targets
            logits = split.outputs(logits, labels.to(device))
        outputs.append((rows, logits.float().cpu()))
    model.train(was_training)
    result = torch.empty(len(split), outputs[0][1].shape[-1])
    for rows, logits in outputs:
        result[rows] = logits
    return result.numpy()


def evaluate(model: nn.Module, task: Task, splits: dict[str, EncodedSplit], batch_size: int,
             device: torch.device) -> tuple[dict[str, dict[str, float | None]], dict[str, np.ndarray]]:
    """Official metrics on every evaluation split, e.g. {"dev": {"f1": 86.1, "accuracy": 80.4}}, and the
    raw outputs (logits) they were computed from, by split."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise SelectuneError(f"batch_size={batch_size!r}: must be a positive whole number of examples")
    outputs = {name: predict(model, split, batch_size, device) for name, split in splits.items()}
    metrics = {name: task.score(outputs[name], split.labels.numpy()) for name, split in splits.items()}
    return metrics, outputs


def prediction_counts(task: Task, outputs: dict[str, np.ndarray]) -> dict[str, dict[str, int]] | None:
    """Rows predicted per label, by split (`Task.prediction_counts`): what a training run's evaluations and
    `selectune eval` record, so a head that answers one class shows. None where there are no outputs or they
    are not class scores (regression, causal JSONL)."""
    counts = {name: task.prediction_counts(values) for name, values in outputs.items()}
    if not counts or any(c is None for c in counts.values()):
        return None
    return counts  # type: ignore[return-value]


def save_outputs(folder: Path, outputs: dict[str, np.ndarray]) -> None:
    """Raw outputs per split as `outputs_<split>.npy` (row order of the split's file)."""
    for name, values in outputs.items():
        np.save(folder / f"outputs_{name}.npy", values)
