"""`selectune predict run=<run> file=<csv|tsv|jsonl> out=<file>`: a stored delta's predictions for new text.

The file's text columns are the ones the task was trained with (a custom task's `task.text_column` /
`task.pair_column`, a GLUE task's Hub names such as sentence1/sentence2) unless `text_column=` /
`pair_column=` name others; a label column is not needed. Each row gets the predicted label's name (or
the score, for regression) and the class probabilities, in the input's order, written as CSV or JSONL by
`out`'s suffix. The output is written whole or not at all: a new file, never through a symbolic link.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from selectune import runfs
from selectune.errors import SelectuneError

KEYS = ("run", "file", "out", "text_column", "pair_column", "batch_size", "device")
USAGE = "selectune predict run=<run dir or delta> file=<csv|tsv|jsonl> out=<preds.csv|preds.jsonl>"


def parse(args: list[str]) -> dict[str, str]:
    """key=value arguments, each known and given once."""
    values: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in KEYS:
            raise SelectuneError(f"predict: unknown argument '{arg}' (keys: {', '.join(KEYS)}); usage: {USAGE}")
        values[key] = value
    for key in ("run", "file", "out"):
        if not values.get(key):
            raise SelectuneError(f"predict needs {key}=: {USAGE}")
    return values


def predict_file(args: dict[str, str]) -> dict[str, Any]:
    from selectune.backbone import load_backbone
    from selectune.commands import RunSpec
    from selectune.delta.taskdelta import TaskDelta
    from selectune.evaluation import predict
    from selectune.runs import resolve_run
    from selectune.tasks import task_spec
    from selectune.tasks.batches import encode_text
    from selectune.tasks.custom import FORMATS, read_rows
    from selectune.tasks.example import Example
    from selectune.trainer import resolve_device

    source, out = Path(args["file"]), Path(args["out"])
    if out.suffix.lower() not in (".csv", ".jsonl"):
        raise SelectuneError(f"out={out}: write .csv or .jsonl")
    if out.exists() or out.is_symlink():
        raise SelectuneError(f"out={out} already exists; choose another file")
    if not out.parent.is_dir():
        raise SelectuneError(f"out={out}: no folder {out.parent}")
    if not source.is_file() or source.suffix.lower() not in FORMATS:
        raise SelectuneError(f"file={source}: no such CSV, TSV or JSONL file")
    batch_size = _positive(args.get("batch_size", "64"), "batch_size")
    run = resolve_run(args["run"], "predict")
    delta = TaskDelta.load(run)
    spec = RunSpec.from_config(OmegaConf.create(delta.meta["config"]))
    if spec.task.family == "vtab":
        raise SelectuneError("predict reads text files; this delta is for an image task")
    task = task_spec(spec.task)
    trained = ((spec.task.text_column, spec.task.pair_column) if spec.task.family == "text"
               else (task.hub_text[0], task.hub_text[1] if len(task.hub_text) > 1 else None))
    text_column = args.get("text_column", trained[0])
    pair_column = args.get("pair_column", trained[1]) or None
    columns = [text_column, *([pair_column] if pair_column else [])]
    rows = read_rows(source, columns, "name them with text_column= / pair_column=")
    backbone = load_backbone(spec.model, task.num_labels, task.is_regression,
                             None if task.is_regression else task.labels, spec.trainer.seed)
    if backbone.base_hash() != delta.meta["base_hash"]:
        raise SelectuneError(f"the base weights of '{backbone.name}' differ from those the delta was trained on")
    delta.apply_to(backbone.model)
    device = resolve_device(args.get("device", "auto"))
    backbone.model.to(device)
    examples = [Example(tuple(str(row[c]) for c in columns), 0.0 if task.is_regression else 0) for _, row in rows]
    max_length = spec.task.max_seq_length or getattr(task, "max_seq_length", 128)
    outputs = predict(backbone.model, encode_text(backbone.tokenizer, examples, max_length, task.is_regression),
                      batch_size, device)
    records = []
    for (_, row), logits in zip(rows, outputs, strict=True):
        record: dict[str, Any] = {c: row[c] for c in columns}
        if task.is_regression:
            record["prediction"] = float(logits[0])
        else:
            probs = torch.softmax(torch.from_numpy(logits).double(), dim=-1).tolist()
            record["prediction"] = task.labels[int(logits.argmax())]
            record.update({f"p_{label}": round(p, 6) for label, p in zip(task.labels, probs, strict=True)})
        records.append(record)
    runfs.write_text(out, _render(records, out.suffix.lower()), out.parent)
    print(f"predict: {len(records):,} rows of {source} -> {out} ({delta.meta['task']} · {delta.meta['method']} "
          f"· {run})")
    return {"rows": len(records), "out": str(out)}


def _render(records: list[dict[str, Any]], suffix: str) -> str:
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in records)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def _positive(value: str, key: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise SelectuneError(f"{key}={value}: a positive whole number")
    return number
