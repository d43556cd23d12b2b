"""The nine GLUE tasks: columns, labels and metrics, and the two ways to read them.

Sources: (a) the GLUE TSV distribution layout in a local folder (`<root>/glue/<TASK>/train.tsv`,
`dev.tsv`; MNLI has `dev_matched.tsv` and `dev_mismatched.tsv`), read with quoting disabled because
some sentences hold unbalanced quotes; (b) the Hub (`nyu-mll/glue`) through `datasets`, for online
users. Label ids agree between the two, so a delta trained on one evaluates on the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from selectune.errors import SelectuneError
from selectune.tasks.example import Example, LabelledSpec
from selectune.tasks.text import excerpt, read_utf8

Column = str | int  # a header name, or a 0-based position for files without a header (CoLA)


@dataclass(frozen=True)
class GlueSpec(LabelledSpec):
    """What a GLUE task is: where its text and label sit in each source, and how it is scored."""

    name: str  # config name, as on the Hub: "mrpc"
    folder: str  # folder in the TSV distribution: "MRPC"
    tsv_text: tuple[Column, ...]
    tsv_label: Column
    hub_text: tuple[str, ...]
    labels: tuple[str, ...] | None  # label strings in the TSV, in Hub id order; None: regression
    metrics: tuple[str, ...]
    primary: str  # the metric that "best" selection and summaries use
    max_seq_length: int = 128
    header: bool = True
    dev_files: tuple[tuple[str, str], ...] = (("dev", "dev"),)  # (split name, TSV stem / Hub split)


GLUE: dict[str, GlueSpec] = {
    spec.name: spec
    for spec in [
        GlueSpec("cola", "CoLA", (3,), 1, ("sentence",), ("0", "1"), ("matthews", "accuracy"), "matthews",
                 max_seq_length=64, header=False),
        GlueSpec("sst2", "SST-2", ("sentence",), "label", ("sentence",), ("0", "1"), ("accuracy",),
                 "accuracy", max_seq_length=64),
        GlueSpec("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("sentence1", "sentence2"),
                 ("0", "1"), ("f1", "accuracy"), "f1"),
        GlueSpec("stsb", "STS-B", ("sentence1", "sentence2"), "score", ("sentence1", "sentence2"),
                 None, ("pearson", "spearman"), "pearson"),
        GlueSpec("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("question1", "question2"),
                 ("0", "1"), ("f1", "accuracy"), "f1"),
        GlueSpec("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("premise", "hypothesis"),
                 ("entailment", "neutral", "contradiction"), ("accuracy",), "accuracy",
                 dev_files=(("dev_matched", "dev_matched"), ("dev_mismatched", "dev_mismatched"))),
        GlueSpec("qnli", "QNLI", ("question", "sentence"), "label", ("question", "sentence"),
                 ("entailment", "not_entailment"), ("accuracy",), "accuracy"),
        GlueSpec("rte", "RTE", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"),
                 ("entailment", "not_entailment"), ("accuracy",), "accuracy"),
        GlueSpec("wnli", "WNLI", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"),
                 ("0", "1"), ("accuracy",), "accuracy"),
    ]
}

# the Hub's ClassLabel names (nyu-mll/glue), in id order: what an exported model's id2label says
LABEL_NAMES = {"cola": ("unacceptable", "acceptable"), "sst2": ("negative", "positive"),
               "mrpc": ("not_equivalent", "equivalent"), "qqp": ("not_duplicate", "duplicate"),
               "mnli": ("entailment", "neutral", "contradiction"), "qnli": ("entailment", "not_entailment"),
               "rte": ("entailment", "not_entailment"), "wnli": ("not_entailment", "entailment")}


def label_names(spec: GlueSpec) -> tuple[str, ...] | None:
    """The names a person reads for the task's label ids (the TSV's own strings are often "0" and "1")."""
    return LABEL_NAMES.get(spec.name, spec.labels) if spec.labels is not None else None


HUB_SPLITS = {"train": "train", "dev": "validation", "dev_matched": "validation_matched",
              "dev_mismatched": "validation_mismatched"}


def glue_spec(name: str) -> GlueSpec:
    if name not in GLUE:
        raise SelectuneError(f"unknown GLUE task '{name}' (known: {', '.join(GLUE)})")
    return GLUE[name]


# --------------------------------------------------------------------------- local TSV files
def task_folder(spec: GlueSpec, data_root: str | None) -> Path:
    """Find `<root>/glue/<TASK>` (or `<root>/<TASK>`, for a `glue_data/` root); say where we looked."""
    if not data_root:
        raise SelectuneError(
            f"no data folder for GLUE {spec.folder}: set SELECTUNE_DATA=<root> (holding glue/{spec.folder}/"
            f"train.tsv) or task.data_root=<root>, or use task.source=hub online")
    root = Path(data_root).expanduser()
    candidates = [root / "glue" / spec.folder, root / spec.folder]
    for folder in candidates:
        if folder.is_dir():
            return folder
    looked = " and ".join(str(c) for c in candidates)
    raise SelectuneError(f"GLUE {spec.folder} data not found: looked in {looked}; set SELECTUNE_DATA or "
                         f"task.data_root to the folder that holds glue/{spec.folder}/")


def read_tsv(spec: GlueSpec, path: Path, limit: int | None = None) -> list[Example]:
    """Parse one GLUE TSV file; a malformed row fails with the file and line number."""
    if not path.is_file():
        raise SelectuneError(f"missing GLUE file {path} (expected the GLUE TSV layout: <TASK>/train.tsv, dev.tsv)")
    lines = read_utf8(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    start = 0
    if spec.header:
        if not lines:
            raise SelectuneError(f"{path}: empty file, expected a header line")
        header = lines[0].rstrip("\r").split("\t")
        start = 1

        def position(col: Column) -> int:
            if isinstance(col, int):
                return col
            if col not in header:
                raise SelectuneError(f"{path}:1: header has no column '{col}' (found: {excerpt(', '.join(header))})")
            return header.index(col)
    else:
        def position(col: Column) -> int:
            assert isinstance(col, int)
            return col

    text_pos = [position(c) for c in spec.tsv_text]
    label_pos = position(spec.tsv_label)
    needed = max(*text_pos, label_pos) + 1
    examples: list[Example] = []
    for lineno, line in enumerate(lines[start:], start=start + 1):
        fields = line.rstrip("\r").split("\t")
        if len(fields) < needed:
            raise SelectuneError(f"{path}:{lineno}: malformed row: expected at least {needed} tab-separated "
                                 f"fields, found {len(fields)}: {excerpt(line)}")
        examples.append(Example(tuple(fields[i] for i in text_pos), _label(spec, fields[label_pos], path, lineno)))
        if limit is not None and len(examples) >= limit:
            break
    return examples


def _label(spec: GlueSpec, raw: str, path: Path | str, lineno: int) -> int | float:
    raw = raw.strip()
    if spec.labels is None:
        try:
            score = float(raw)
        except ValueError:
            raise SelectuneError(f"{path}:{lineno}: malformed row: score {excerpt(raw)} is not a number") from None
        if not math.isfinite(score):  # nan / 1e999 would train to a NaN loss or score as "n/a"
            raise SelectuneError(f"{path}:{lineno}: malformed row: score {excerpt(raw)} is not a finite number")
        return score
    if raw not in spec.labels:
        raise SelectuneError(f"{path}:{lineno}: malformed row: label {excerpt(raw)} is not one of "
                             f"{', '.join(spec.labels)}")
    return spec.labels.index(raw)


def read_local(spec: GlueSpec, data_root: str | None, limits: dict[str, int | None]) -> dict[str, list[Example]]:
    folder = task_folder(spec, data_root)
    splits = {"train": "train", **dict(spec.dev_files)}
    return {split: read_tsv(spec, folder / f"{stem}.tsv", limits.get(split)) for split, stem in splits.items()}


# --------------------------------------------------------------------------- the Hub (datasets)
def read_hub(spec: GlueSpec, hub_path: str, limits: dict[str, int | None]) -> dict[str, list[Example]]:
    """Load `hub_path` (default nyu-mll/glue, or a local folder in the Hub's layout) with `datasets`."""
    import datasets

    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(hub_path, spec.name)
    except Exception as err:
        raise SelectuneError(f"could not load '{hub_path}' config '{spec.name}' with datasets "
                             f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); offline, "
                             f"use task.source=local with SELECTUNE_DATA, or pass online=true") from err
    out: dict[str, list[Example]] = {}
    for split in ("train", *(name for name, _ in spec.dev_files)):
        hub_split = HUB_SPLITS[split]
        if hub_split not in dataset:
            raise SelectuneError(f"'{hub_path}' config '{spec.name}' has no split '{hub_split}' "
                                 f"(found: {', '.join(dataset)})")
        rows = dataset[hub_split]
        missing = [c for c in (*spec.hub_text, "label") if c not in rows.column_names]
        if missing:
            raise SelectuneError(f"'{hub_path}' split '{hub_split}' lacks columns {missing} "
                                 f"(found: {rows.column_names})")
        limit = limits.get(split)
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        examples = []
        for i, row in enumerate(rows):
            label = row["label"]
            if spec.labels is None:
                label = float(label)
                if not math.isfinite(label):
                    raise SelectuneError(f"'{hub_path}' {hub_split} row {i}: score {label} is not a finite number")
            elif not 0 <= int(label) < spec.num_labels:
                raise SelectuneError(f"'{hub_path}' {hub_split} row {i}: label {label} outside "
                                     f"0..{spec.num_labels - 1}")
            examples.append(Example(tuple(str(row[c]) for c in spec.hub_text), label))
        out[split] = examples
    return out
