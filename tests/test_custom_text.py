"""A user's own text task (task=text/custom, recipes text/custom_<method>) through the real CLI: CSV, TSV and
JSONL files with named columns, classification and regression, a carved validation split, and one line for
each bad file."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from conftest import TINY, run_cli

GOOD, BAD = ["good", "great", "lovely", "fine"], ["bad", "awful", "poor", "dull"]


def reviews(n: int, seed: int) -> list[tuple[str, str, float]]:
    """(text, label, score) rows whose label the text gives away."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 1
        word = rng.choice(GOOD if positive else BAD)
        rows.append((f"the film was {word}, said {rng.choice(['ann', 'bo', 'cy'])}", "pos" if positive else "neg",
                     4.0 + rng.random() if positive else rng.random()))
    return rows


@pytest.fixture
def files(tmp_path) -> Path:
    with (tmp_path / "train.csv").open("w") as handle:
        handle.write("review,sentiment,score\n")
        handle.writelines(f'"{t}",{label},{s:.3f}\n' for t, label, s in reviews(32, 0))
    with (tmp_path / "dev.jsonl").open("w") as handle:
        handle.writelines(json.dumps({"review": t, "sentiment": label}) + "\n" for t, label, _ in reviews(16, 1))
    with (tmp_path / "scores.tsv").open("w") as handle:
        handle.write("review\tscore\n")
        handle.writelines(f"{t}\t{s:.3f}\n" for t, _, s in reviews(32, 2))
    return tmp_path


COLUMNS = ["task.text_column=review", "task.label_column=sentiment"]
FILES = ["task.train_file=train.csv", "task.dev_file=dev.jsonl", *COLUMNS]


def one_error(result, *patterns: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("selectune: error: "), result.stderr
    for pattern in patterns:
        assert pattern in lines[0], lines[0]


def test_csv_train_jsonl_dev_through_train_eval_export(files):
    result = run_cli("train", "text/custom_bitfit", *FILES, "task.name=reviews", *TINY, "trainer.max_steps=4",
                     "trainer.lr=1e-2", cwd=files)
    assert result.returncode == 0, result.stderr
    run = Path(result.stdout.strip().splitlines()[-1])
    assert run.parts[:2] == ("runs", "reviews_bitfit")
    results = json.loads((files / run / "results.json").read_text())
    assert set(results["metrics"]["dev"]) == {"f1", "accuracy"} and results["task"] == "reviews"
    result = run_cli("eval", "run=runs/reviews_bitfit", cwd=files)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("reviews · bitfit · dev 16 examples (whole split) · dev: f1 ")
    assert json.loads((files / run / "eval_reviews.json").read_text())["metrics"] == results["metrics"]
    result = run_cli("export", f"run={run}", "out=merged", cwd=files)
    assert result.returncode == 0, result.stderr
    config = json.loads((files / "merged" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}  # the file's labels, sorted: the head's order
    (files / "new.tsv").write_text("review\nthe film was great, said bo\nthe film was awful, said cy\n")
    result = run_cli("predict", "run=runs/reviews_bitfit", "file=new.tsv", "out=preds.csv", cwd=files)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"predict: 2 rows of new.tsv -> preds.csv (reviews · bitfit · {run})")
    rows = list(csv.DictReader((files / "preds.csv").open()))
    assert [list(r) for r in rows] == [["review", "prediction", "p_neg", "p_pos"]] * 2
    assert rows[0]["review"] == "the film was great, said bo" and {r["prediction"] for r in rows} <= {"neg", "pos"}
    assert all(abs(float(r["p_neg"]) + float(r["p_pos"]) - 1) < 1e-5 for r in rows)
    one_error(run_cli("predict", f"run={run}", "file=new.tsv", "out=preds.csv", cwd=files),
              "out=preds.csv already exists")
    one_error(run_cli("predict", f"run={run}", "file=new.tsv", "out=p.jsonl", "text_column=body", cwd=files),
              "new.tsv: no column 'body' (found: review); name them with text_column=")


def test_tsv_regression_with_a_carved_validation_split(files):
    result = run_cli("train", "text/custom_linear", "task.train_file=scores.tsv", "task.text_column=review",
                     "task.label_column=score", "task.regression=true", *TINY, "task.validation=0.25",
                     "task.metrics=[spearman,pearson]", "trainer.max_steps=2", "out_dir=reg", cwd=files)
    assert result.returncode == 0, result.stderr
    results = json.loads((files / "reg" / "results.json").read_text())
    assert list(results["metrics"]) == ["val"] and list(results["metrics"]["val"]) == ["spearman", "pearson"]
    assert results["selected_on"] == "val"
    result = run_cli("validate", "text/custom_linear", "task.train_file=scores.tsv", "task.text_column=review",
                     "task.label_column=score", "task.regression=true", *TINY, "task.validation=0.25", cwd=files)
    assert "schedule: 9 steps (3 per epoch of 24 training examples)" in result.stdout, result.stderr


@pytest.mark.parametrize(("change", "extra", "message"), [
    (None, ["task.text_column=body"], "train.csv: no column 'body' (found: review, sentiment, score); name the "
                                      "columns with task.text_column"),
    (("dev.jsonl", '{"review": "so so", "sentiment": "meh"}\n'), [],
     "dev.jsonl:1: unknown label 'meh' (the labels, those of the training file: neg, pos)"),
    (("train.csv", ""), [], "train.csv: no examples (the file is empty below its header)"),
    (("train.csv", "review,sentiment\n"), [], "train.csv: no examples (the file is empty below its header)"),
    (("dev.jsonl", ""), [], "dev.jsonl: no examples (the file is empty)"),
    (None, ["task.dev_file=null"], "task=text/custom needs an evaluation split: task.dev_file=<file>, or "
                                   "task.validation=0.1"),
    (None, ["task.train_file=nope.csv"], "task.train_file=nope.csv: no such file"),
    (None, ["task.metrics=[pearson]"], "task.metrics: 'pearson' is no classification metric"),
    (None, ["task.labels=[neg,pos,meh]", "task.metrics=[f1]"], "f1 is the positive class's F1 of a two-label task"),
])
def test_bad_files_and_settings_fail_in_one_line(files, change, extra, message):
    if change is not None:
        (files / change[0]).write_text(change[1])
    one_error(run_cli("validate", "text/custom_bitfit", *FILES, *extra, *TINY, cwd=files), message)
    assert not (files / "runs").exists()


def test_a_bad_file_stops_train_before_a_run_folder_exists(files):
    (files / "dev.jsonl").write_text('{"review": "so so", "sentiment": "meh"}\n')
    one_error(run_cli("train", "text/custom_bitfit", *FILES, *TINY, cwd=files), "unknown label 'meh'")
    assert not (files / "runs").exists()


@pytest.mark.parametrize(("text", "message"), [
    ('{"review": "ok", "sentiment": "pos"}\n{"review": "so so",\n', "dev.jsonl:2: malformed line: not JSON"),
    ('["so so", "pos"]\n', 'dev.jsonl:1: malformed line: expected an object with "review" and "sentiment", '
                            'found list'),
    ('{"review": "ok", "sentiment": "pos"}\n{"review": "so so"}\n', "dev.jsonl:2: row has no 'sentiment'"),
    ('{"review": "a\u2028b", "sentiment": "pos"}\n', None),  # U+2028 inside a string: one line, not two
])
def test_jsonl_rows_name_file_and_line_of_a_bad_one(tmp_path, text, message):
    from selectune.errors import SelectuneError
    from selectune.tasks.custom import read_rows

    path = tmp_path / "dev.jsonl"
    path.write_text(text, encoding="utf-8")
    if message is None:
        assert [row["review"] for _, row in read_rows(path, ["review", "sentiment"])] == ["a\u2028b"]
        return
    with pytest.raises(SelectuneError) as err:
        read_rows(path, ["review", "sentiment"])
    assert str(err.value).startswith(str(path)) and message in str(err.value)
