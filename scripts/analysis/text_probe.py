"""How far a frozen MiniLM goes on a GLUE task: logistic regression on three readings of the frozen encoder.

    python scripts/analysis/text_probe.py [--tasks rte mrpc] [--write docs/results.md]

The question behind it: selectune's linear probe (head + pooler on the frozen encoder) and the PEFT methods stay
near the majority class on RTE and MRPC. Is that the features, or how the head reads them? all-MiniLM-L6-v2 was
trained by sentence-transformers with *mean pooling*; the classification head reads BERT's pooler over [CLS].
So: scikit-learn's LogisticRegression (lbfgs, standardised features; Ridge for STS-B's scores) on
  - [CLS]: the last hidden state of the first token,
  - pooler: the shipped tanh(W h[CLS]) (what a head on a frozen pooler reads),
  - mean: the mask-weighted mean of the last hidden states (the model's own sentence embedding),
each with the inverse regularisation C chosen on the recipe's `val` (10% of train carved at seed 42, the
sweeps' split), then GLUE dev scored once at that C. The pair is encoded jointly, as every selectune GLUE run
reads it. The features come from one fp32 eval-mode pass of `recipe=glue/<task>_linear`'s backbone.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection and frozen_probe
from selectune.commands import RunSpec, build, encode_splits
from selectune.config import compose
from selectune.tasks import load_task
from selectune.tasks.batches import eval_batches
from selectune.tasks.glue import GLUE

from docsection import head_commit, publish
from frozen_probe import C_GRID, choose_c, fitted

READINGS = ("cls", "pooler", "mean")


@torch.no_grad()
def readings(task_name: str) -> tuple[object, dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The task, {split: {reading: features}} and {split: labels} for train (the sweeps' 90%), val and dev."""
    cfg = compose("train", [f"recipe=glue/{task_name}_linear", "task.validation=0.1", "trainer.seed=42"])
    spec = RunSpec.from_config(cfg)
    task = load_task(spec.task)
    backbone, _ = build(spec, task)
    splits = encode_splits(task, backbone, ["train", "val", "dev"])
    encoder = backbone.model.base_model.eval()
    out: dict[str, dict[str, np.ndarray]] = {}
    labels = {}
    hidden_size = encoder.config.hidden_size
    for name, split in splits.items():
        out[name] = {r: np.empty((len(split), hidden_size), dtype=np.float32) for r in READINGS}
        for rows in eval_batches(split, 64):  # length-sorted batches: each row's features go back to its row
            batch = split.batch(rows)
            batch.pop("labels")
            result = encoder(**batch)
            hidden, mask = result.last_hidden_state, batch["attention_mask"].unsqueeze(-1).float()
            out[name]["cls"][rows] = hidden[:, 0].numpy()
            out[name]["pooler"][rows] = result.pooler_output.numpy()
            out[name]["mean"][rows] = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
        labels[name] = split.labels.numpy()
    return task, out, labels


def fit_score(task, primary: str, x_train, y_train, x_eval, y_eval, c: float) -> float:
    """The frozen probe at C fitted on train, scored on eval with the task's own metric."""
    model = fitted(x_train, y_train, c, regression=task.spec.is_regression)
    outputs = model.predict(x_eval) if task.spec.is_regression else model.predict_log_proba(x_eval)
    return float(task.score(outputs, y_eval)[primary])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc"])
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    lines = ["| task (metric) | features | C (chosen on val) | val | dev | majority class on dev |",
             "|---|---|---|---|---|---|"]
    for name in args.tasks:
        task, x, y = readings(name)
        primary = GLUE[name].primary
        if task.spec.is_regression:  # a constant prediction has no correlation: the floor is 0 by definition
            floor = 0.0
        else:
            majority = np.zeros((len(y["dev"]), 2))
            majority[:, np.bincount(y["train"].astype(int)).argmax()] = 1.0
            floor = task.score(majority, y["dev"])[primary]
        for reading in READINGS:
            val = {c: fit_score(task, primary, x["train"][reading], y["train"], x["val"][reading], y["val"], c)
                   for c in C_GRID}
            best = choose_c(val)
            dev = fit_score(task, primary, x["train"][reading], y["train"], x["dev"][reading], y["dev"], best)
            lines.append(f"| {name} ({primary}) | {reading} | {best:.0e} | {val[best]:.2f} | {dev:.2f} | "
                         f"{floor:.2f} |")
            print(lines[-1], flush=True)
    commit = head_commit()
    body = (f"Generated at {commit} by `python scripts/analysis/text_probe.py --tasks {' '.join(args.tasks)}` "
            f"on {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}: logistic regression on "
            f"the frozen all-MiniLM-L6-v2 (fp32, standardised features), C chosen on the carved `val` (10% of train, "
            f"seed 42), dev scored once; the majority class is the training split's (STS-B: ridge regression, "
            f"alpha = 1/C; a constant score has no correlation, so its floor is 0).\n\n" + "\n".join(lines))
    publish(body, args.write, "results:text_probe")


if __name__ == "__main__":
    main()
