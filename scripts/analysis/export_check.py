"""Exported model vs in-training model: do their dev-set logits agree?

    SELECTUNE_DATA=../shared/data python scripts/analysis/export_check.py <run dir> [--write docs/results.md]

Loads the run's `outputs_<split>.npy` (the logits the in-training model — delta forms attached —
produced at the selected evaluation, written by `selectune train` with trainer.select=last), exports
the delta with `selectune export` in each dtype, reloads every export with plain
`AutoModelForSequenceClassification.from_pretrained` (`AutoModelForImageClassification` for an image model;
no selectune code in the forward pass), and reports max |Δ logit| on the task's dev split(s).
`--section` names the docs section to write (default: the MiniLM one, results:export_check).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--section", default="results:export_check")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    from omegaconf import OmegaConf
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    from selectune.backbone import load_backbone
    from selectune.commands import RunSpec, encode_splits
    from selectune.delta.taskdelta import TaskDelta
    from selectune.evaluation import predict
    from selectune.tasks import load_task

    results = json.loads((args.run / "results.json").read_text())
    if results["selection"] != "last":
        sys.exit("export_check needs a run trained with trainer.select=last")
    delta = TaskDelta.load(args.run)
    spec = RunSpec.from_config(OmegaConf.create(delta.meta["config"]))
    task = load_task(spec.task)
    backbone = load_backbone(spec.model, task.spec.num_labels, task.spec.is_regression, None, spec.trainer.seed)
    splits = encode_splits(task, backbone, task.eval_splits)
    rows = ["| export dtype | split | max abs logit diff vs in-training | changed base entries | lost in dtype |",
            "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            out = Path(tmp) / dtype
            printed = subprocess.run([sys.executable, "-m", "selectune", "export", f"run={args.run}", f"out={out}",
                                      f"dtype={dtype}"], capture_output=True, text=True, check=True).stdout
            changed, lost = re.search(r"([\d,]+) changed base entries, ([\d,]+)", printed).groups()
            auto = AutoModelForSequenceClassification if backbone.tokenizer else AutoModelForImageClassification
            model = auto.from_pretrained(out).float()
            for split, encoded in splits.items():
                exported = predict(model, encoded, 128, torch.device("cpu"))
                in_training = np.load(args.run / f"outputs_{split}.npy")
                diff = float(np.abs(exported - in_training).max())
                rows.append(f"| {dtype} | {split} ({len(encoded)} rows) | {diff:.2e} | {changed} | {lost} |")
    title = "Exported model = in-training model" + ("" if backbone.tokenizer else f" ({backbone.name})")
    body = (f"### {title}\n\n"
            f"`python scripts/analysis/export_check.py {args.run}` on the {results['method']} run of {results['task']} "
            f"(seed {results['seed']}): dev logits of the in-training model (delta forms attached) vs the merged, "
            f"saved and reloaded plain transformers model.\n\n" + "\n".join(rows))
    publish(body, args.write, args.section)


if __name__ == "__main__":
    main()
