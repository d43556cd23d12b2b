"""Tasks: the data and the metric of one benchmark task (GLUE today)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from selectune.errors import SelectuneError
from selectune.tasks import glue, metrics
from selectune.tasks.example import Example


@dataclass
class TaskConfig:
    """The `task` config group (task/glue/<name>.yaml)."""

    name: str
    family: str = "glue"
    source: str = "local"  # local: TSV files under data_root; hub: `datasets.load_dataset(hub_path, name)`
    data_root: Optional[str] = None  # None: $SELECTUNE_DATA
    hub_path: str = "nyu-mll/glue"
    max_seq_length: Optional[int] = None  # None: the task's default
    max_train_examples: Optional[int] = None  # the first N rows (quick runs, tests)
    max_eval_examples: Optional[int] = None


@dataclass
class Task:
    """A loaded task: its spec, its examples per split, and how to score predictions."""

    spec: glue.GlueSpec
    splits: dict[str, list[Example]]
    max_seq_length: int

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def eval_splits(self) -> list[str]:
        return [s for s in self.splits if s != "train"]

    def score(self, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
        """Official metrics from raw model outputs (logits, or one score per example)."""
        preds = outputs.reshape(-1) if self.spec.is_regression else outputs.argmax(axis=-1)
        return metrics.compute(self.spec.metrics, preds, labels)


def load_task(cfg: TaskConfig) -> Task:
    if cfg.family != "glue":
        raise SelectuneError(f"unknown task family '{cfg.family}' (known: glue)")
    spec = glue.glue_spec(cfg.name)
    limits = {"train": cfg.max_train_examples}
    limits.update({split: cfg.max_eval_examples for split, _ in spec.dev_files})
    if cfg.source == "local":
        splits = glue.read_local(spec, cfg.data_root or os.environ.get("SELECTUNE_DATA"), limits)
    elif cfg.source == "hub":
        splits = glue.read_hub(spec, cfg.hub_path, limits)
    else:
        raise SelectuneError(f"unknown task.source '{cfg.source}' (use local or hub)")
    for split, examples in splits.items():
        if not examples:
            raise SelectuneError(f"GLUE {spec.name} split '{split}' has no examples")
    return Task(spec, splits, cfg.max_seq_length or spec.max_seq_length)
