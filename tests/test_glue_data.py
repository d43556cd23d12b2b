"""Both data sources: the GLUE TSV layout and the Hub's format (a local dataset in it)."""

from __future__ import annotations

import pytest

from selectune.errors import SelectuneError
from selectune.tasks import TaskConfig, load_task
from selectune.tasks.glue import GLUE, read_tsv


@pytest.mark.parametrize("name", sorted(GLUE))
def test_every_task_parses_from_the_tsv_layout(name, glue_root):
    task = load_task(TaskConfig(name=name, data_root=str(glue_root)))
    spec = GLUE[name]
    assert set(task.splits) == {"train", *(s for s, _ in spec.dev_files)}
    first = task.splits["train"][0]
    assert len(first.texts) == len(spec.tsv_text)
    assert all(t.strip() for t in first.texts)
    if spec.is_regression:
        assert isinstance(first.label, float)
    else:
        assert {ex.label for ex in task.splits["train"]} == set(range(spec.num_labels))


def test_mrpc_byte_order_mark_and_labels(glue_root):
    examples = read_tsv(GLUE["mrpc"], glue_root / "glue" / "MRPC" / "train.tsv")
    assert len(examples) == 48 and examples[0].label == 0 and examples[1].label == 1


def test_mnli_has_matched_and_mismatched_dev(glue_root):
    task = load_task(TaskConfig(name="mnli", data_root=str(glue_root)))
    assert task.eval_splits == ["dev_matched", "dev_mismatched"]


def test_limits_take_the_first_rows(glue_root):
    task = load_task(TaskConfig(name="rte", data_root=str(glue_root), max_train_examples=5, max_eval_examples=3))
    assert len(task.splits["train"]) == 5 and len(task.splits["dev"]) == 3


def test_unbalanced_quotes_are_kept_verbatim(tmp_path):
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text('sentence\tlabel\nhe said " no \t1\n"quoted\t0\n')
    examples = read_tsv(GLUE["sst2"], folder / "train.tsv")
    assert [e.texts[0] for e in examples] == ['he said " no ', '"quoted'] and [e.label for e in examples] == [1, 0]


def test_real_files_have_the_official_sizes():
    from conftest import REAL_DATA

    if not (REAL_DATA / "glue" / "RTE").is_dir():
        pytest.skip("real GLUE files not present")
    sizes = {"cola": (8551, 1043), "mrpc": (3668, 408), "rte": (2490, 277), "stsb": (5749, 1500),
             "wnli": (635, 71)}
    for name, (train, dev) in sizes.items():
        task = load_task(TaskConfig(name=name, data_root=str(REAL_DATA)))
        assert (len(task.splits["train"]), len(task.splits["dev"])) == (train, dev), name


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("rows,error", [
    ("0\ta\tb\tentailment\n1\tonly two\n", r"RTE/train.tsv:3: malformed row: expected at least 4"),
    ("0\ta\tb\tmaybe\n", r"RTE/train.tsv:2: malformed row: label 'maybe'"),
])
def test_malformed_rows_name_file_and_line(tmp_path, rows, error):
    folder = tmp_path / "glue" / "RTE"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + rows)
    with pytest.raises(SelectuneError, match=error):
        read_tsv(GLUE["rte"], folder / "train.tsv")


def test_bad_score_names_file_and_line(tmp_path):
    folder = tmp_path / "glue" / "STS-B"
    folder.mkdir(parents=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    (folder / "dev.tsv").write_text(f"{header}\n0\tg\tf\ty\t0\tn\tn\ta\tb\tfive\n")
    with pytest.raises(SelectuneError, match=r"dev.tsv:2: malformed row: score 'five' is not a number"):
        read_tsv(GLUE["stsb"], folder / "dev.tsv")


def test_missing_data_folder_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("SELECTUNE_DATA", raising=False)
    with pytest.raises(SelectuneError, match=r"looked in .*glue/MRPC and .*MRPC.*SELECTUNE_DATA"):
        load_task(TaskConfig(name="mrpc", data_root=str(tmp_path)))
    with pytest.raises(SelectuneError, match="set SELECTUNE_DATA"):
        load_task(TaskConfig(name="mrpc"))


def test_unknown_task():
    with pytest.raises(SelectuneError, match="unknown GLUE task 'mrcp'"):
        load_task(TaskConfig(name="mrcp"))


# ------------------------------------------------------------------ the Hub's format
def write_hub_glue(root, config: str, rows: dict[str, list[dict]]) -> None:
    """A dataset repo laid out as nyu-mll/glue is on the Hub: <config>/<split>-00000-of-00001.parquet
    plus a README whose YAML header declares the configs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / config).mkdir(parents=True)
    files = []
    for split, data in rows.items():
        pq.write_table(pa.Table.from_pylist(data), root / config / f"{split}-00000-of-00001.parquet")
        files.append(f"    - split: {split}\n      path: {config}/{split}-*")
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: {config}\n  data_files:\n" + "\n".join(files)
                                    + "\n---\n")


def test_hub_source_reads_the_hub_column_format(tmp_path):
    rows = {"train": [{"sentence1": f"s{i}", "sentence2": f"t{i}", "label": i % 2, "idx": i} for i in range(6)],
            "validation": [{"sentence1": "a", "sentence2": "b", "label": 1, "idx": 0}],
            "test": [{"sentence1": "c", "sentence2": "d", "label": -1, "idx": 0}]}
    write_hub_glue(tmp_path, "rte", rows)
    task = load_task(TaskConfig(name="rte", source="hub", hub_path=str(tmp_path)))
    assert [e.label for e in task.splits["train"]] == [0, 1, 0, 1, 0, 1]
    assert task.splits["dev"][0].texts == ("a", "b")


def test_hub_source_mnli_and_stsb_columns(tmp_path):
    mnli = {s: [{"premise": "p", "hypothesis": "h", "label": 2, "idx": 0}]
            for s in ("train", "validation_matched", "validation_mismatched")}
    write_hub_glue(tmp_path / "m", "mnli", mnli)
    task = load_task(TaskConfig(name="mnli", source="hub", hub_path=str(tmp_path / "m")))
    assert task.splits["dev_mismatched"][0].label == 2 and task.splits["train"][0].texts == ("p", "h")
    stsb = {s: [{"sentence1": "a", "sentence2": "b", "label": 3.5, "idx": 0}] for s in ("train", "validation")}
    write_hub_glue(tmp_path / "s", "stsb", stsb)
    assert load_task(TaskConfig(name="stsb", source="hub", hub_path=str(tmp_path / "s"))).splits["dev"][0].label == 3.5


def test_hub_source_missing_columns_is_a_clear_error(tmp_path):
    write_hub_glue(tmp_path, "rte", {s: [{"text": "a", "label": 0}] for s in ("train", "validation")})
    with pytest.raises(SelectuneError, match=r"lacks columns \['sentence1', 'sentence2'\]"):
        load_task(TaskConfig(name="rte", source="hub", hub_path=str(tmp_path)))


def test_hub_offline_fails_fast_with_a_hint():
    with pytest.raises(SelectuneError, match="task.source=local"):
        load_task(TaskConfig(name="rte", source="hub", hub_path="nyu-mll/glue"))
