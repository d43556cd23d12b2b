"""selectune's linear probe against a standard frozen-feature probe on the same features and splits.

    python scripts/analysis/reference_probe.py [--task dtd10] [--override key=value ...] [--write docs/results.md]

The reference: scikit-learn's LogisticRegression (lbfgs, multinomial) on the classifier's input of
`Dinov2ForImageClassification` — [CLS] ‖ mean patch token of the frozen backbone, standardised on the
training rows — with the inverse regularisation C chosen on val200 (select protocol: train800 -> val200),
then refitted on train800val200 at that C and scored once on test (final protocol). selectune's probe:
`selectune train recipe=vtab/<task>_linear method.cached=true` (its recipe's schedule and lr) on the same two
protocols. The features come from one eval-mode pass (selectune/features.py), the ones the cached probe
trains on.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection and frozen_probe
from selectune.commands import RunSpec, build, encode_splits, train
from selectune.config import compose
from selectune.features import extract, head_plan
from selectune.tasks import load_task

from docsection import publish
from frozen_probe import C_GRID, choose_c, fitted


def features(recipe: str, overrides: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(features, labels) of train800, val200, train800val200 and test, from one frozen pass over the final
    protocol's images (the select protocol's rows are among them: looked up by image path)."""
    splits = {}
    for protocol in ("final", "select"):
        cfg = compose("train", [f"recipe={recipe}", f"task.protocol={protocol}", *overrides])
        spec = RunSpec.from_config(cfg)
        task = load_task(spec.task)
        if protocol == "final":
            backbone, method = build(spec, task)
            method.attach(backbone, None)
        splits[protocol] = encode_splits(task, backbone, list(task.splits))
    plan = head_plan(backbone)
    by_path: dict[Path, np.ndarray] = {}
    out = {}
    for name, split in splits["final"].items():
        stored = extract(backbone.model, plan, split, 64, torch.device("cpu"))
        x = stored.features.reshape(len(stored), -1).numpy()
        by_path.update(zip(split.paths, x, strict=True))
        out[name if name == "test" else "train+val"] = (x, stored.labels.numpy())
    for name, split in splits["select"].items():
        out[name] = (np.stack([by_path[p] for p in split.paths]), split.labels.numpy())
    return out


def logistic(train_xy, eval_xy, c: float) -> float:
    """Accuracy (%) on eval of the frozen probe at C fitted on train."""
    return 100.0 * float((fitted(*train_xy, c).predict(eval_xy[0]) == eval_xy[1]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="dtd10")
    parser.add_argument("--override", nargs="*", default=[])
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    recipe = f"vtab/{args.task}_linear"
    xy = features(recipe, args.override)
    val_scores = {c: logistic(xy["train"], xy["val"], c) for c in C_GRID}
    for c, score in val_scores.items():
        print(f"C={c:.0e}: val {score:.2f}", flush=True)
    best_c = choose_c(val_scores)
    test = logistic(xy["train+val"], xy["test"], best_c)
    ours = {}
    with tempfile.TemporaryDirectory() as tmp:
        for protocol in ("select", "final"):
            cfg = compose("train", [f"recipe={recipe}", f"task.protocol={protocol}", "method.cached=true",
                                    "trainer.progress=false", *args.override])
            results = train(cfg, Path(tmp) / protocol)
            ours[protocol] = next(iter(results["metrics"].values()))["accuracy"]
    n = {k: len(v[1]) for k, v in xy.items()}
    extra = "".join(" " + o for o in args.override)
    command = f"python scripts/analysis/reference_probe.py --task {args.task}" + (
        f" --override{extra}" if args.override else "")
    grid = " · ".join(f"{c:.0e}: {s:.1f}" for c, s in val_scores.items())
    body = "\n".join([
        f"### Linear probe vs a standard frozen-feature probe ({args.task})\n",
        f"Generated {date.today()} by `{command}` on {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}. Both read the same frozen features (what the classifier reads; DINOv2: [CLS] ‖ "
        f"mean patch token; one eval-mode pass, `recipe={recipe}`{extra}) on the same splits ({n['train']} train / "
        f"{n['val']} val / {n['test']} "
        f"test images). Reference: logistic regression (scikit-learn, lbfgs, standardised features), C chosen "
        f"on val, refitted on train+val, test scored once. selectune: `selectune train recipe={recipe} "
        f"method.cached=true` (the recipe's schedule and lr), select and final protocol, seed 42.\n",
        "| probe | val accuracy (select) | test accuracy (final) |", "|---|---|---|",
        f"| logistic regression, C={best_c:.0e} (chosen on val) | {val_scores[best_c]:.2f} | {test:.2f} |",
        f"| selectune `method=linear method.cached=true` | {ours['select']:.2f} | {ours['final']:.2f} |",
        f"\nVal accuracy per C: {grid}."])
    publish(body, args.write, f"reference_probe:{args.task}")


if __name__ == "__main__":
    main()
