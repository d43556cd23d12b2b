"""Zero-shot GLUE dev scores of a causal LM as shipped, asked with selectune's prompt (tasks/causal.py).

    SELECTUNE_DATA=../shared/data python scripts/analysis/causal_zero_shot.py sst2 rte [--model smollm2_135m]
        [--max-eval N] [--batch 16]

The base model is scored exactly as a fine-tuned run's evaluation scores it (restricted argmax over the
label words' first tokens at the answer position; GLUE's metrics), with no delta: the floor every
fine-tuned row is compared with. Prints one JSON line per task (metrics, rows, seconds).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="+")
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--max-eval", type=int, default=None)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    import torch

    from selectune.commands import RunSpec, build, encode_splits
    from selectune.config import compose
    from selectune.evaluation import evaluate

    for name in args.tasks:
        overrides = [f"model={args.model}", f"task=causal/{name}", "method=full", "task.max_train_examples=1"]
        if args.max_eval:
            overrides.append(f"task.max_eval_examples={args.max_eval}")
        spec = RunSpec.from_config(compose("train", overrides))
        from selectune.tasks import load_task

        task = load_task(spec.task)
        backbone, _ = build(spec, task)
        splits = encode_splits(task, backbone, task.eval_splits)
        t0 = time.perf_counter()
        metrics, outputs = evaluate(backbone.model.eval(), task, splits, args.batch, torch.device("cpu"))
        predicted = {s: [int((o.argmax(-1) == k).sum()) for k in range(o.shape[-1])] for s, o in outputs.items()}
        print(json.dumps({"task": name, "model": backbone.name, "metrics": metrics,
                          "rows": {s: len(v) for s, v in splits.items()}, "predicted_per_label": predicted,
                          "label_words": list(task.spec.words), "seconds": round(time.perf_counter() - t0, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
