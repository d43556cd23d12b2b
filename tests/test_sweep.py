"""scripts/reproduction/sweep.py: the winner is chosen on validation scores and written into a recipe that composes."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sweep", REPO / "scripts" / "reproduction" / "sweep.py")
sweep = importlib.util.module_from_spec(spec)
sys.modules["sweep"] = sweep  # dataclasses look their module up
spec.loader.exec_module(sweep)


def test_table_picks_the_best_validation_score_and_marks_failures():
    a, b, c = (sweep.Candidate("rte", "lora", lr, 3) for lr in (2e-4, 5e-4, 1e-3))
    body, winners = sweep.table({a: 55.0, b: 61.5, c: None})
    assert winners == {("rte", "lora"): b}
    assert "0.001/3 → —" in body and "lr 0.0005, 3 epochs" in body


def test_ties_go_to_the_shorter_schedule_then_the_smaller_lr():
    short, long_ = sweep.Candidate("rte", "lora", 5e-4, 3), sweep.Candidate("rte", "lora", 2e-4, 10)
    assert sweep.table({long_: 60.0, short: 60.0})[1][("rte", "lora")] == short


def test_written_recipe_composes_with_the_choice(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    shutil.copytree(REPO / "recipes" / "glue", tmp_path / "recipes" / "glue")
    monkeypatch.setattr(sweep, "REPO", tmp_path)
    winner = sweep.Candidate("mrpc", "lora", 1e-3, 10)
    path = sweep.write_recipe(winner, {winner: 80.5, sweep.Candidate("mrpc", "lora", 2e-4, 3): 70.25}, 0.1)
    text = path.read_text()
    assert "1e-3" not in text and "lr: 0.001" in text and "0.0002/3ep 70.25" in text
    sweep.write_recipe(winner, {winner: 80.5}, 0.1)  # written twice: one block, not two
    assert path.read_text().count("lr:") == 1 and path.read_text().count("validation:") == 1
    assert not (REPO / "recipes" / "glue" / "mrpc_lora.yaml").exists()  # a composed name: the file is made
    cfg = OmegaConf.load(path)  # a recipe is a global-package overlay: these keys override the groups
    assert list(cfg.defaults) == ["/preset/glue/lora", {"override /task": "glue/mrpc"}]
    assert (cfg.trainer.lr, cfg.trainer.epochs, cfg.trainer.select, cfg.task.validation) == (1e-3, 10, "best", 0.1)


def test_a_recipe_file_keeps_its_per_task_values_when_the_choice_is_written(tmp_path, monkeypatch):
    shutil.copytree(REPO / "recipes" / "glue", tmp_path / "recipes" / "glue")
    monkeypatch.setattr(sweep, "REPO", tmp_path)
    winner = sweep.Candidate("rte", "sdiff", 1e-4, 8)
    cfg = OmegaConf.load(sweep.write_recipe(winner, {winner: 60.0}, 0.1))
    assert cfg.method.l0_weight == 6.25e-8  # RTE's own λ stays
    assert list(cfg.defaults) == ["/preset/glue/sdiff", {"override /task": "glue/rte"}]
    assert (cfg.trainer.lr, cfg.trainer.epochs) == (1e-4, 8)
