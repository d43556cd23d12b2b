"""VTAB-1k: the list-file layout, its errors, both averages, and methods on a ViT unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from selectune.errors import SelectuneError
from selectune.tasks import TaskConfig, load_task
from selectune.tasks.vtab import CLASSES, GROUPS, averages, read_list

from conftest import run_cli


def write_vtab(root, name="dtd", classes=3, per_split=(12, 6, 6)):
    """A VTAB-1k task folder exactly as the PETL community lays it out."""
    folder = root / "vtab-1k" / name
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(sum(per_split)):
        path = f"images/{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / path)
        rows.append(f"{path} {i % classes}\n")
    train, val, _ = per_split
    (folder / "train800.txt").write_text("".join(rows[:train]))
    (folder / "val200.txt").write_text("".join(rows[train:train + val]))
    (folder / "train800val200.txt").write_text("".join(rows[:train + val]))
    (folder / "test.txt").write_text("".join(rows[train + val:]))
    return folder


def test_registry_has_19_tasks_in_three_groups():
    assert [len(GROUPS[g]) for g in ("natural", "specialized", "structured")] == [7, 4, 8]
    assert len(CLASSES) == 19 and CLASSES["sun397"] == 397 and CLASSES["smallnorb_ele"] == 9


def test_list_files_and_protocols(tmp_path):
    write_vtab(tmp_path)
    select = load_task(TaskConfig(name="dtd", family="vtab", data_root=str(tmp_path)))
    assert set(select.splits) == {"train", "val"} and len(select.splits["train"]) == 12
    final = load_task(TaskConfig(name="dtd", family="vtab", data_root=str(tmp_path), protocol="final"))
    assert set(final.splits) == {"train", "test"} and len(final.splits["train"]) == 18
    assert final.splits["test"][0].path.name == "018.jpg" and final.splits["test"][0].label == 0


def test_bad_line_names_file_and_line(tmp_path):
    folder = write_vtab(tmp_path)
    with (folder / "val200.txt").open("a") as handle:
        handle.write("images/000.jpg\n")
    with pytest.raises(SelectuneError, match=r"val200.txt:7: bad line 'images/000.jpg'"):
        read_list(folder / "val200.txt", 47)
    (folder / "test.txt").write_text("images/000.jpg 99\n")
    with pytest.raises(SelectuneError, match=r"test.txt:1: label 99 outside 0..46"):
        read_list(folder / "test.txt", 47)


def test_missing_image_names_file_and_line(tmp_path):
    folder = write_vtab(tmp_path)
    (folder / "images" / "003.jpg").unlink()
    with pytest.raises(SelectuneError, match=r"train800.txt:4: missing image .*images/003.jpg"):
        load_task(TaskConfig(name="dtd", family="vtab", data_root=str(tmp_path)))


def test_missing_folder_and_unknown_task(tmp_path):
    with pytest.raises(SelectuneError, match="looked in .*vtab-1k/dtd"):
        load_task(TaskConfig(name="dtd", family="vtab", data_root=str(tmp_path)))
    with pytest.raises(SelectuneError, match="unknown VTAB-1k task 'imagenet'.*task.num_classes"):
        load_task(TaskConfig(name="imagenet", family="vtab", data_root=str(tmp_path)))


def test_both_averages_on_hand_made_numbers():
    accuracy = {"cifar": 70.0, "dtd": 60.0,  # natural mean 65
                "eurosat": 90.0,  # specialized mean 90
                "kitti": 40.0, "dmlab": 50.0, "clevr_count": 60.0}  # structured mean 50
    result = averages(accuracy)
    assert result["tasks"] == 6
    assert result["mean_of_tasks"] == pytest.approx((70 + 60 + 90 + 40 + 50 + 60) / 6)  # 61.67
    assert result["mean_of_group_means"] == pytest.approx((65 + 90 + 50) / 3)  # 68.33
    assert result["natural_mean"] == 65 and result["specialized_mean"] == 90 and result["structured_mean"] == 50


@pytest.mark.parametrize("method", ["lora", "sara", "spt_lora", "adalora"])
def test_methods_run_unchanged_on_a_vit(method, tmp_path, monkeypatch):
    from selectune.commands import evaluate_delta, train
    from selectune.config import compose
    from selectune.export import export

    write_vtab(tmp_path, classes=3, per_split=(16, 8, 8))
    monkeypatch.setenv("SELECTUNE_DATA", str(tmp_path))  # eval reads the data root from here, never the delta
    extra = {"sara": ["budget.fraction=null", "budget.count=3000"],
             "spt_lora": ["budget.fraction=null", "budget.count=6000", "method.probe_batches=2"],
             "adalora": ["method.target_total=8", "method.t_init=1", "method.t_final=1", "method.delta_t=1"]}
    cfg = compose("train", [f"recipe=vtab/dtd_{method}", "model=vit_micro_random", f"task.data_root={tmp_path}",
                            "task.num_classes=3", "trainer.max_steps=4", "trainer.batch_size=8",
                            "trainer.progress=false", "trainer.precision=fp32", *extra.get(method, [])])
    results = train(cfg, tmp_path / "run")
    assert set(results["metrics"]) == {"val"} and results["family"] == "vtab"
    assert evaluate_delta(str(tmp_path / "run"), None, 8, "cpu")["metrics"] == results["metrics"]
    if method != "spt_lora":
        export(str(tmp_path / "run"), str(tmp_path / "hf"))
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(tmp_path / "hf")
        assert model.config.num_labels == 3 and AutoImageProcessor.from_pretrained(tmp_path / "hf") is not None


def test_report_prints_both_averages(tmp_path):
    for task, acc in (("cifar", 70.0), ("eurosat", 90.0), ("kitti", 40.0), ("dmlab", 60.0)):
        folder = tmp_path / "runs" / task
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({
            "task": task, "family": "vtab", "method": "lora", "seed": 1, "metrics": {"test": {"accuracy": acc}},
            "budget": {"stored": 100, "backbone": 10000, "head": 10}, "delta_bytes": 10, "step_time_s": 1.0,
            "peak_memory_mb": 10.0}))
    selecting = tmp_path / "runs" / "cifar_select"  # a val200 score: its own line, never averaged with test
    selecting.mkdir()
    (selecting / "results.json").write_text((tmp_path / "runs" / "cifar" / "results.json").read_text()
                                            .replace('"test": {"accuracy": 70.0}', '"val": {"accuracy": 10.0}'))
    result = run_cli("report", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "runs" / "report.md").read_text()
    # mean of tasks (70 + 90 + 40 + 60) / 4 = 65; mean of group means (70 + 90 + 50) / 3 = 70
    assert "mean of tasks" in text and "| lora | test | 4 | 65.00 | 70.00 |" in text
    assert "| lora | val | 1 | 10.00 | 10.00 |" in text


def test_a_final_run_of_a_recipe_is_the_recipes_row_and_another_lr_a_variant(tmp_path):
    """`task.protocol=final` names the split a run reports on (its own column), not a variant: the runs of the
    written recipes (each task its own chosen lr) make one row per method, so the VTAB averages are per method."""
    from omegaconf import OmegaConf

    from selectune.config import compose
    from selectune.report import flat_settings, variants

    runs = []
    for task, extra in (("dtd10", []), ("digits", []), ("cifar10_1k", ["trainer.lr=0.5"])):
        cfg = compose("train", [f"recipe=vtab/{task}_linear", "task.protocol=final"] + extra)
        OmegaConf.save(cfg, tmp_path / f"{task}.yaml")
        runs.append({"task": task, "method": "linear", "family": "vtab", "budget": {"stored": 10},
                     "settings": flat_settings(OmegaConf.to_container(OmegaConf.load(tmp_path / f"{task}.yaml")))})
    assert variants(runs) == ["", "", "trainer.lr=0.5"]
