"""Short runs on slices of the real GLUE files with the real pretrained MiniLM (seconds each).

They check what tiny random models cannot: that the shipped weights load offline, that the real
files tokenise, and that a few steps on real text move the model the right way.
"""

from __future__ import annotations

import json

import pytest

from selectune.commands import evaluate_delta, train
from selectune.config import compose

from conftest import REAL_DATA, run_cli

pytestmark = pytest.mark.skipif(not (REAL_DATA / "glue" / "SST-2").is_dir(), reason="real GLUE files not present")


@pytest.fixture
def real_env(monkeypatch):
    monkeypatch.setenv("SELECTUNE_DATA", str(REAL_DATA))


def test_minilm_learns_sst2_sentiment_in_a_few_steps(real_env, tmp_path):
    cfg = compose("train", ["recipe=glue/sst2_full", "task.max_train_examples=256", "task.max_eval_examples=128",
                            "trainer.max_steps=12", "trainer.batch_size=32", "trainer.lr=1e-4", "trainer.log_every=4",
                            "trainer.warmup_ratio=0", "trainer.progress=false"])
    results = train(cfg, tmp_path / "run")
    # all-MiniLM-L6-v2 without the new head and the pooler (147,840 values trained with the head: model=minilm)
    assert results["budget"]["backbone"] == 22_713_216 - 147_840
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert len(losses) == 3 and losses[-1] < losses[0]  # real text, real weights: the loss goes down
    assert results["metrics"]["dev"]["accuracy"] > 55.0  # above chance after 12 steps (one SST-2 epoch: ~88)
    assert evaluate_delta(str(tmp_path / "run"), None, 64, "cpu", max_examples=128)["metrics"] == results["metrics"]


def test_real_mrpc_lora_slice_through_the_cli(real_env, tmp_path):
    result = run_cli("train", "recipe=glue/mrpc_lora", "task.max_train_examples=64", "task.max_eval_examples=64",
                     "trainer.max_steps=2", f"out_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["budget"]["trainable"] == 73_728 + 147_840 + 770  # r=8 on 6 x (query, value), + pooler + head
    assert 0.0 <= saved["metrics"]["dev"]["accuracy"] <= 100.0


def test_recipes_ship_inside_the_wheel(tmp_path):
    import subprocess
    import sys
    import zipfile

    from conftest import REPO

    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            str(REPO), "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("selectune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    recipes = {n for n in names if n.startswith("selectune/conf/recipe/glue/")}
    assert "selectune/conf/recipe/glue/cola_sdiff.yaml" in recipes and len(recipes) >= 10
    presets = {n for n in names if n.startswith("selectune/conf/preset/")}
    assert "selectune/conf/preset/glue/full.yaml" in presets and len(presets) >= 31  # the names are composed from these
    assert "selectune/conf/train.yaml" in names and "selectune/conf/hydra/job_logging/selectune.yaml" in names
