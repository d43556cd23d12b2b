"""Zero-shot GLUE dev scores of a causal LM as shipped, asked with selectune's prompt (tasks/causal.py).

    SELECTUNE_DATA=../shared/data python scripts/analysis/causal_zero_shot.py sst2 rte [--model smollm2_135m]
        [--max-eval N] [--batch 16] [--write docs/results.md] [--lines <earlier output>]

The base model is scored exactly as a fine-tuned run's evaluation scores it (restricted argmax over the
label words' first tokens at the answer position; GLUE's metrics), with no delta: the floor every
fine-tuned row is compared with. Prints one JSON line per task (metrics, rows, seconds); --write puts
them as a table in the `results:causal_zero_shot` section (--lines: from an earlier run's output, no rescoring).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import write_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="+")
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--max-eval", type=int, default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--lines", type=Path, default=None)
    args = parser.parse_args()
    if args.lines is not None:
        rows = [json.loads(line) for line in args.lines.read_text().splitlines() if line.startswith("{")]
        write(args.write, [r for r in rows if r["task"] in args.tasks])
        return
    rows = []
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
        rows.append({"task": name, "model": backbone.name, "metrics": metrics,
                     "rows": {s: len(v) for s, v in splits.items()}, "predicted_per_label": predicted,
                     "label_words": list(task.spec.words), "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    if args.write is not None:
        write(args.write, rows)


def write(path: Path | None, rows: list[dict]) -> None:
    if path is None:
        raise SystemExit("--lines needs --write <file>")
    lines = ["Zero-shot: the model as shipped, asked with selectune's prompt and scored by its label words",
             "(`python scripts/analysis/causal_zero_shot.py " + " ".join(r["task"] for r in rows)
             + " --write docs/results.md`; one thread, CPU).", "",
             "| task | split | rows | metrics | predictions per label word | s |", "|---|---|---|---|---|---|"]
    for r in rows:
        for split, values in r["metrics"].items():
            shown = ", ".join(f"{k} {v:.2f}" for k, v in values.items())
            words = ", ".join(f"{w} {n}" for w, n in zip(r["label_words"], r["predicted_per_label"][split],
                                                         strict=True))
            lines.append(f"| {r['task']} | {split} | {r['rows'][split]} | {shown} | {words} | {r['seconds']} |")
    write_section(path, "results:causal_zero_shot", "\n".join(lines))


if __name__ == "__main__":
    main()
