"""A validation split carved from the training file, for every choice a user makes (learning rate,
epochs, `trainer.select=best`, λ, γ), so that GLUE dev stays a reported number that nothing was chosen
on. VTAB-1k has its own val200 for this (`task.protocol=select`).

The carve is a pure function of the training file and a fixed seed, so every run of a sweep (any method,
any `trainer.seed`) holds out the same rows; classification is stratified (each label keeps its share).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from selectune.errors import SelectuneError

VALIDATION_SEED = 1234  # fixed: the held-out rows do not move with trainer.seed
SPLIT = "val"  # the split name in metrics.jsonl / results.json

T = TypeVar("T")


def validation_size(setting: float, n_train: int) -> int:
    """Rows to hold out: `setting` is a fraction in (0, 1) or a whole count ≥ 1; at least one row of
    training must remain."""
    if setting <= 0:
        raise SelectuneError(f"task.validation={setting:g}: use a fraction in (0, 1) or a row count ≥ 1")
    if setting < 1:
        size = max(1, round(setting * n_train))
    elif float(setting).is_integer():
        size = int(setting)
    else:
        raise SelectuneError(f"task.validation={setting:g}: a count must be a whole number (or a fraction < 1)")
    if size >= n_train:
        raise SelectuneError(f"task.validation={setting:g} holds out {size} of the {n_train} training rows: "
                             f"nothing would be left to train on")
    return size


def carve(examples: Sequence[T], labels: Sequence[int | float], setting: float,
          stratified: bool) -> tuple[list[T], list[T]]:
    """(train, validation): `validation_size` rows chosen with a fixed seed, stratified by label when
    `stratified`; both keep the file's order, so a truncated run (`max_train_examples`) sees a prefix."""
    n = len(examples)
    size = validation_size(setting, n)
    rng = np.random.default_rng(VALIDATION_SEED)
    if not stratified:
        held = rng.permutation(n)[:size]
    else:
        by_label: dict[int | float, list[int]] = {}
        for i, label in enumerate(labels):
            by_label.setdefault(label, []).append(i)
        # largest remainder: per-label quotas that add up to exactly `size`
        exact = {label: size * len(rows) / n for label, rows in by_label.items()}
        quota = {label: math.floor(q) for label, q in exact.items()}
        for label in sorted(exact, key=lambda k: (quota[k] - exact[k], str(k)))[:size - sum(quota.values())]:
            quota[label] += 1
        held = np.concatenate([rng.permutation(rows)[:quota[label]]
                               for label, rows in sorted(by_label.items(), key=lambda kv: str(kv[0]))])
    mask = np.zeros(n, dtype=bool)
    mask[held] = True
    return ([e for e, m in zip(examples, mask, strict=True) if not m],
            [e for e, m in zip(examples, mask, strict=True) if m])
