"""A user's own text task (`task=text/custom`): CSV, TSV or JSONL files with named columns.

GLUE names its columns and labels in code (glue.py); here the user names them in the config
(`task.text_column`, `task.pair_column`, `task.label_column`), and the labels are the training file's
own values unless `task.labels` lists them (that order is the head's id order, and the exported model's
id2label). Classification or regression (`task.regression=true`), scored by the metrics the user picks
(the first is the one choices are made on). A dev file is optional when `task.validation` carves one
from the training file, as for GLUE. Nothing in the files is trusted: a missing column, a label the
training file does not have, an empty file or an unreadable row fails with one line naming the file.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from selectune.errors import SelectuneError
from selectune.tasks.example import Example, LabelledSpec
from selectune.tasks.text import excerpt, jsonl_objects, read_utf8

FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
CLASSIFICATION_METRICS = ("accuracy", "f1", "f1_macro", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")


@dataclass(frozen=True)
class TextSpec(LabelledSpec):
    """What a custom text task is: the spec the rest of selectune reads (labels, metrics, primary)."""

    name: str
    labels: tuple[str, ...] | None  # None: regression
    metrics: tuple[str, ...]
    primary: str
    max_seq_length: int = 128


def _file(value: Optional[str], key: str) -> Path:
    if not value:
        raise SelectuneError(f"task=text/custom needs task.{key}=<file> (CSV, TSV or JSONL with named columns)")
    path = Path(value).expanduser()
    if not path.is_file():
        raise SelectuneError(f"task.{key}={value}: no such file")
    if path.suffix.lower() not in FORMATS:
        raise SelectuneError(f"task.{key}={value}: unknown format '{path.suffix}' (use .csv, .tsv or .jsonl)")
    return path


COLUMN_HINT = "name the columns with task.text_column / task.pair_column / task.label_column"


def read_rows(path: Path, columns: list[str], hint: str = COLUMN_HINT) -> list[tuple[int, dict[str, Any]]]:
    """(line number, {column: value}) for every row of a CSV/TSV (header line first) or JSONL file (one object
    a line); the file must hold at least one row and every named column."""
    kind = FORMATS[path.suffix.lower()]
    rows: list[tuple[int, dict[str, Any]]] = []
    if kind == "jsonl":
        found: set[str] = set()
        for lineno, row in jsonl_objects(path, " and ".join(f'"{c}"' for c in columns)):
            missing = [c for c in columns if c not in row]
            if missing and rows:  # the first row names the columns; later rows must have them
                raise SelectuneError(f"{path}:{lineno}: row has no '{missing[0]}': {excerpt(json.dumps(row))}")
            found |= set(row)
            if missing:
                _no_column(path, missing[0], sorted(found), hint)
            rows.append((lineno, row))
    else:
        reader = csv.reader(io.StringIO(read_utf8(path), newline=""), delimiter="," if kind == "csv" else "\t")
        try:
            header = next(reader, None)
            if header is not None:
                header = [h.strip() for h in header]
                for column in columns:
                    if column not in header:
                        _no_column(path, column, header, hint)
                for fields in reader:
                    if not any(f.strip() for f in fields):
                        continue
                    if len(fields) != len(header):
                        raise SelectuneError(f"{path}:{reader.line_num}: {len(fields)} fields, the header has "
                                             f"{len(header)}: {excerpt(','.join(fields))}")
                    rows.append((reader.line_num, dict(zip(header, fields, strict=True))))
        except csv.Error as err:
            raise SelectuneError(f"{path}:{reader.line_num}: unreadable row ({err})") from None
    if not rows:
        raise SelectuneError(f"{path}: no examples (the file is empty{'' if kind == 'jsonl' else ' below its header'})")
    return rows


def _no_column(path: Path, column: str, found: list[str], hint: str) -> None:
    raise SelectuneError(f"{path}: no column '{column}' (found: {_listed(found)}); {hint}")


def _listed(names: Any, limit: int = 200) -> str:
    """Names for an error line, cut at `limit` characters (a file's header can be anything)."""
    text = ", ".join(str(n) for n in names)
    return text if len(text) <= limit else text[:limit] + "…"


def text_spec(cfg: Any) -> TextSpec:
    """The spec of `cfg` (the task section): labels from `task.labels`, else the training file's label values
    (sorted; integers in numeric order), metrics checked against the problem."""
    labels: tuple[str, ...] | None = None
    if not cfg.regression:
        if cfg.labels:
            labels = tuple(str(label) for label in cfg.labels)
            if len(set(labels)) != len(labels):
                raise SelectuneError(f"task.labels lists a label twice: {list(labels)}")
        else:
            path = _file(cfg.train_file, "train_file")
            values = {str(row[cfg.label_column]).strip() for _, row in read_rows(path, [cfg.label_column])}
            labels = tuple(sorted(values, key=lambda v: (0, int(v), "") if _is_int(v) else (1, 0, v)))
        if len(labels) < 2:
            raise SelectuneError(f"task.label_column '{cfg.label_column}' has only the label {list(labels)}: "
                                 f"classification needs two labels or more (task.regression=true for scores)")
    allowed = REGRESSION_METRICS if cfg.regression else CLASSIFICATION_METRICS
    default = REGRESSION_METRICS if cfg.regression else (("f1", "accuracy") if len(labels) == 2 else ("accuracy",))
    metrics = tuple(cfg.metrics) if cfg.metrics else default
    for metric in metrics:
        if metric not in allowed:
            kind = "regression" if cfg.regression else "classification"
            raise SelectuneError(f"task.metrics: '{metric}' is no {kind} metric (use {', '.join(allowed)})")
    if "f1" in metrics and labels is not None and len(labels) != 2:
        raise SelectuneError(f"task.metrics: f1 is the positive class's F1 of a two-label task; this one has "
                             f"{len(labels)} labels: use f1_macro")
    return TextSpec(cfg.name, labels, metrics, metrics[0], cfg.max_seq_length or 128)


def _is_int(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


def read_examples(spec: TextSpec, cfg: Any, path: Path, limit: Optional[int], source: str) -> list[Example]:
    """The examples of one file; `source` says where the labels came from (for an unknown label's line)."""
    columns = [cfg.text_column, *([cfg.pair_column] if cfg.pair_column else []), cfg.label_column]
    examples = []
    for lineno, row in read_rows(path, columns):
        texts = tuple(str(row[c]) if row[c] is not None else "" for c in columns[:-1])
        raw = str(row[cfg.label_column]).strip()
        if spec.labels is None:
            try:
                label: int | float = float(raw)
            except ValueError:
                raise SelectuneError(f"{path}:{lineno}: label {excerpt(raw)} is not a number "
                                     f"(task.regression=true)") from None
        elif raw in spec.labels:
            label = spec.labels.index(raw)
        else:
            raise SelectuneError(f"{path}:{lineno}: unknown label {excerpt(raw)} (the labels, {source}: "
                                 f"{_listed(spec.labels)})")
        examples.append(Example(texts, label))
        if limit is not None and len(examples) >= limit:
            break
    return examples


def read_splits(spec: TextSpec, cfg: Any) -> dict[str, list[Example]]:
    """train (and dev, when task.dev_file names one) as Examples."""
    if not cfg.dev_file and cfg.validation is None:
        raise SelectuneError("task=text/custom needs an evaluation split: task.dev_file=<file>, or "
                             "task.validation=0.1 to hold out a share of the training file")
    source = "task.labels" if cfg.labels else "those of the training file"
    splits = {"train": read_examples(spec, cfg, _file(cfg.train_file, "train_file"),
                                     None if cfg.validation is not None else cfg.max_train_examples, source)}
    if cfg.dev_file:
        splits["dev"] = read_examples(spec, cfg, _file(cfg.dev_file, "dev_file"), cfg.max_eval_examples, source)
    return splits
