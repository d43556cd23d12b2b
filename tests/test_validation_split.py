"""task.validation: a split carved from train (fixed seed, stratified) that choices are made on, while
GLUE dev stays the reported split."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from selectune.commands import train
from selectune.errors import SelectuneError
from selectune.tasks import TaskConfig, load_task
from selectune.tasks.validation import carve, validation_size

from conftest import compose_run


def test_size_is_a_fraction_or_a_whole_count():
    assert validation_size(0.1, 100) == 10
    assert validation_size(0.001, 100) == 1  # never an empty split
    assert validation_size(25, 100) == 25
    for bad in (0, -0.5, 2.5, 100, 150):
        with pytest.raises(SelectuneError, match="task.validation"):
            validation_size(bad, 100)


def test_carve_is_disjoint_complete_stratified_and_fixed():
    rows = list(range(1000))
    labels = [0] * 700 + [1] * 250 + [2] * 50
    train, val = carve(rows, labels, 0.2, stratified=True)
    assert len(val) == 200 and sorted(train + val) == rows and not set(train) & set(val)
    assert Counter(labels[i] for i in val) == {0: 140, 1: 50, 2: 10}  # each label keeps its share
    assert train == sorted(train) and val == sorted(val)  # the file's order is kept
    assert carve(rows, labels, 0.2, stratified=True) == (train, val)  # the same rows every time
    _, plain = carve(rows, labels, 0.2, stratified=False)
    assert len(plain) == 200 and plain != val


def test_rounding_still_adds_up_to_the_count():
    labels = [0] * 7 + [1] * 7 + [2] * 7
    _, val = carve(list(range(21)), labels, 4, stratified=True)
    assert len(val) == 4 and max(Counter(labels[i] for i in val).values()) == 2


def test_load_task_holds_the_rows_out_of_train(data_env):
    whole = load_task(TaskConfig(name="mrpc"))
    task = load_task(TaskConfig(name="mrpc", validation=0.25, max_train_examples=20))
    assert len(task.splits["val"]) == 12 and len(task.splits["train"]) == 20
    assert not set(task.splits["val"]) & set(task.splits["train"])
    assert set(task.splits["val"]) <= set(whole.splits["train"])
    assert task.splits["dev"] == whole.splits["dev"]  # dev untouched
    assert task.eval_splits == ["dev", "val"] and task.select_split == "val"
    assert whole.select_split == "dev"  # without it, as before


def test_vtab_refuses_a_carved_split():
    with pytest.raises(SelectuneError, match="val200"):
        load_task(TaskConfig(name="dtd", family="vtab", validation=0.1))


def test_best_is_chosen_on_validation_and_dev_is_reported(data_env, tmp_path):
    results = train(compose_run("glue/cola_linear", "trainer.epochs=3", "trainer.select=best",
                                "trainer.lr=0.05", "task.validation=16"), tmp_path / "run")
    val = [e["metrics"]["val"]["matthews"] for e in results["evals"]]
    assert results["selected_on"] == "val"
    assert results["metrics"]["val"]["matthews"] == max(val)
    assert results["selected_step"] == results["evals"][val.index(max(val))]["step"]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert next(iter(saved["metrics"])) == "dev"  # reports read the first split: dev
