"""Tasks: the data and the metric of one benchmark task (GLUE text, VTAB-1k images, causal-LM instructions)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from selectune.errors import SelectuneError
from selectune.tasks import causal, custom, glue, metrics, validation, vtab
from selectune.tasks.batches import EncodedSplit, ImageSplit, encode_text


@dataclass
class TaskConfig:
    """The `task` config group (task/glue/<name>.yaml, task/vtab/<name>.yaml)."""

    name: str
    family: str = "glue"  # glue | vtab | causal | text (a user's own CSV/TSV/JSONL: task=text/custom)
    source: str = "local"  # local: files under data_root; hub (glue): `datasets.load_dataset(hub_path, name)`
    data_root: Optional[str] = None  # None: $SELECTUNE_DATA
    hub_path: str = "nyu-mll/glue"
    max_seq_length: Optional[int] = None  # text: None = the task's default
    protocol: str = "select"  # vtab: select (train800 -> val200) | final (train800val200 -> test)
    num_classes: Optional[int] = None  # vtab: for a task folder outside the 19
    max_train_examples: Optional[int] = None  # the first N rows (quick runs, tests)
    max_eval_examples: Optional[int] = None
    # glue: hold out a fraction (0-1) or a count of the training rows as split `val` (fixed seed,
    # stratified); choices (trainer.select=best, sweeps) are made on it, dev is only reported
    validation: Optional[float] = None
    score_dev: bool = True  # with `validation`: False leaves dev unscored (a sweep never looks at it, nor pays for it)
    # causal: GLUE as instructions (name: a GLUE task) or name=jsonl with these files ({"prompt", "response"} lines)
    train_file: Optional[str] = None
    dev_file: Optional[str] = None
    template: Optional[str] = None  # causal GLUE: the prompt, {0} / {1} for the texts (None: the task's own)
    label_words: Optional[list[str]] = None  # causal GLUE: one answer word per label (None: the task's own)
    text_column: str = "text"
    pair_column: Optional[str] = None
    label_column: str = "label"
    labels: Optional[list[str]] = None  # the head's label order; None: the training file's values, sorted
    regression: bool = False
    metrics: Optional[list[str]] = None  # the first is the one choices are made on; None: f1+accuracy / pearson


@dataclass
class Task:
    """A loaded task: its spec, its examples per split, and how to score predictions."""

    spec: glue.GlueSpec | vtab.VtabSpec | causal.PromptSpec | causal.JsonlSpec | custom.TextSpec
    splits: dict[str, list[Any]]
    max_seq_length: int = 128
    family: str = "glue"  # its entry in FAMILIES: how its splits become model inputs

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def eval_splits(self) -> list[str]:
        return [s for s in self.splits if s != "train"]

    @property
    def select_split(self) -> str:
        """The split choices are made on: the carved validation split when there is one (GLUE dev is
        then only reported), else the first evaluation split (VTAB's val200 under `protocol=select`)."""
        return validation.SPLIT if validation.SPLIT in self.splits else self.eval_splits[0]

    def score(self, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
        """Official metrics from raw model outputs (logits, or one score per example); a spec that scores
        its own outputs (causal JSONL: perplexity) does."""
        own = getattr(self.spec, "score", None)
        if own is not None:
            return own(outputs, labels)
        preds = outputs.reshape(-1) if self.spec.is_regression else outputs.argmax(axis=-1)
        return metrics.compute(self.spec.metrics, preds, labels)

    def prediction_counts(self, outputs: np.ndarray) -> dict[str, int] | None:
        """How many rows each label was predicted for (argmax), by label name: the one-look check that a run
        did not collapse to one class. None where outputs are not class scores (regression, causal JSONL)."""
        if self.spec.is_regression or getattr(self.spec, "score", None) is not None:
            return None
        counts = np.bincount(outputs.argmax(axis=-1), minlength=self.spec.num_labels)
        names = self.spec.labels or tuple(str(i) for i in range(self.spec.num_labels))
        return {str(name): int(n) for name, n in zip(names, counts, strict=True)}

    def encode(self, split: str, backbone: Any) -> EncodedSplit:
        """The split as model inputs, the family's way (tokenised text, images at the backbone's size)."""
        return FAMILIES[self.family].encode(self, split, backbone)


# ---------------------------------------------------------------------- families
def _glue_spec(cfg: TaskConfig) -> glue.GlueSpec:
    return glue.glue_spec(cfg.name)


def _glue_read(cfg: TaskConfig, spec: glue.GlueSpec, root: Optional[str]) -> Task:
    limits = {"train": None if cfg.validation is not None else cfg.max_train_examples}
    limits.update({split: cfg.max_eval_examples for split, _ in spec.dev_files})
    if cfg.source == "local":
        splits = glue.read_local(spec, root, limits)
    elif cfg.source == "hub":
        splits = glue.read_hub(spec, cfg.hub_path, limits)
    else:
        raise SelectuneError(f"unknown task.source '{cfg.source}' (use local or hub)")
    if cfg.validation is not None:  # carved from the whole file, then the limits apply
        train, val = validation.carve(splits["train"], [e.label for e in splits["train"]],
                                      cfg.validation, stratified=not spec.is_regression)
        splits["train"] = train[:cfg.max_train_examples]
        splits[validation.SPLIT] = val[:cfg.max_eval_examples]
    return Task(spec, splits, cfg.max_seq_length or spec.max_seq_length, "glue")


def _glue_encode(task: Task, split: str, backbone: Any) -> EncodedSplit:
    return encode_text(backbone.tokenizer, task.splits[split], task.max_seq_length, task.spec.is_regression)


def _vtab_spec(cfg: TaskConfig) -> vtab.VtabSpec:
    return vtab.vtab_spec(cfg.name, cfg.num_classes)


def _vtab_read(cfg: TaskConfig, spec: vtab.VtabSpec, root: Optional[str]) -> Task:
    if cfg.validation is not None:
        raise SelectuneError("task.validation is for GLUE: VTAB-1k holds out val200 itself "
                             "(task.protocol=select trains on train800 and scores val200)")
    limits = {"train": cfg.max_train_examples, "dev": cfg.max_eval_examples}
    return Task(spec, vtab.read_local(spec, root, cfg.protocol, limits), family="vtab")


def _vtab_encode(task: Task, split: str, backbone: Any) -> EncodedSplit:
    import torch

    examples = task.splits[split]
    return ImageSplit([e.path for e in examples], torch.tensor([e.label for e in examples]), backbone.image_size)


def _causal_spec(cfg: TaskConfig) -> causal.PromptSpec | causal.JsonlSpec:
    if cfg.name == "jsonl":
        return causal.JsonlSpec(cfg.name)
    if cfg.name not in causal.PROMPTS:
        raise SelectuneError(f"unknown causal task '{cfg.name}' (known: jsonl, {', '.join(causal.PROMPTS)})")
    return causal.prompt_spec(cfg.name, cfg.template, cfg.label_words)


def _causal_read(cfg: TaskConfig, spec: causal.PromptSpec | causal.JsonlSpec, root: Optional[str]) -> Task:
    if isinstance(spec, causal.PromptSpec):
        task = _glue_read(cfg, spec.glue, root)  # GLUE's files, limits and carved validation split
        return Task(spec, task.splits, cfg.max_seq_length or 256, "causal")  # room for the chat frame
    if not cfg.train_file or not cfg.dev_file:
        raise SelectuneError("task causal/jsonl needs task.train_file=<path> and task.dev_file=<path> (JSONL: one "
                             "{\"prompt\": ..., \"response\": ...} object per line)")
    train_limit = None if cfg.validation is not None else cfg.max_train_examples
    splits = {"train": causal.read_jsonl(Path(cfg.train_file), train_limit),
              "dev": causal.read_jsonl(Path(cfg.dev_file), cfg.max_eval_examples)}
    if cfg.validation is not None:
        train, val = validation.carve(splits["train"], [0] * len(splits["train"]), cfg.validation, stratified=False)
        splits["train"] = train[:cfg.max_train_examples]
        splits[validation.SPLIT] = val[:cfg.max_eval_examples]
    return Task(spec, splits, cfg.max_seq_length or 256, "causal")


def _causal_encode(task: Task, split: str, backbone: Any) -> EncodedSplit:
    if isinstance(task.spec, causal.PromptSpec):
        return causal.encode_prompts(task.spec, backbone.tokenizer, task.splits[split], task.max_seq_length)
    return causal.encode_jsonl(backbone.tokenizer, task.splits[split], task.max_seq_length)


def is_causal(spec: Any) -> bool:
    """Whether the task trains a causal LM (no new head: the model answers in tokens)."""
    return bool(getattr(spec, "causal_lm", False))


def _text_spec(cfg: TaskConfig) -> custom.TextSpec:
    return custom.text_spec(cfg)


def _text_read(cfg: TaskConfig, spec: custom.TextSpec, root: Optional[str]) -> Task:
    splits = custom.read_splits(spec, cfg)
    if cfg.validation is not None:  # carved as for GLUE: from the whole file, then the limits apply
        train, val = validation.carve(splits["train"], [e.label for e in splits["train"]], cfg.validation,
                                      stratified=not spec.is_regression)
        splits["train"] = train[:cfg.max_train_examples]
        splits[validation.SPLIT] = val[:cfg.max_eval_examples]
    return Task(spec, splits, spec.max_seq_length, "text")


@dataclass(frozen=True)
class Family:
    """One benchmark family: how a task config names its spec (labels, metrics: no data read, so export
    can size the head), reads its splits, and turns a split into model inputs."""

    spec: Callable[[TaskConfig], Any]
    read: Callable[[TaskConfig, Any, Optional[str]], Task]
    encode: Callable[[Task, str, Any], EncodedSplit]


FAMILIES: dict[str, Family] = {
    "glue": Family(_glue_spec, _glue_read, _glue_encode),
    "vtab": Family(_vtab_spec, _vtab_read, _vtab_encode),
    "causal": Family(_causal_spec, _causal_read, _causal_encode),
    "text": Family(_text_spec, _text_read, _glue_encode),
}


def family(cfg: TaskConfig) -> Family:
    if cfg.family not in FAMILIES:
        raise SelectuneError(f"unknown task family '{cfg.family}' (known: {', '.join(FAMILIES)})")
    return FAMILIES[cfg.family]


def task_spec(cfg: TaskConfig) -> glue.GlueSpec | vtab.VtabSpec | custom.TextSpec:
    """The task's spec (labels, metrics) without reading its data."""
    return family(cfg).spec(cfg)


def load_task(cfg: TaskConfig) -> Task:
    fam = family(cfg)
    task = fam.read(cfg, fam.spec(cfg), cfg.data_root or os.environ.get("SELECTUNE_DATA"))
    if cfg.validation is not None and not cfg.score_dev:  # a sweep's candidate: choices on val, dev never seen
        task.splits = {name: task.splits[name] for name in ("train", validation.SPLIT)}
    for split, examples in task.splits.items():
        if not examples:
            raise SelectuneError(f"{cfg.family} {cfg.name} split '{split}' has no examples")
    return task
