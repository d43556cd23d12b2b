"""torchrun with 2 gloo processes on CPU, for every method: the ranks agree, and the stored delta is the
single-process one at the same global batch (fp32 tolerance). Dropout is off so the two can agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selectune.delta.taskdelta import TaskDelta
from selectune.methods import METHODS
from selectune.methods.diffpruning import DiffPruning

from conftest import TINY, kill_after_first_checkpoint, run_cli

NO_DROPOUT = ["+model.config_overrides.hidden_dropout_prob=0.0",
              "+model.config_overrides.attention_probs_dropout_prob=0.0"]
COMMON = [*TINY, *NO_DROPOUT, "task.max_train_examples=48", "task.max_eval_examples=16"]
# every registered method that runs on text, with what it says it needs to finish a few steps on the tiny
# model (Method.quick_test: SaRA re-selects at step 2, AdaLoRA masks, diff pruning reaches phase 2)
PER_METHOD = {name: ["trainer.max_steps=4", *cls.quick_test["text"]] for name, cls in sorted(METHODS.items())
              if "text" in cls.quick_test}


def torchrun(*args: str, cwd, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "selectune", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def runs(glue_root, tmp_path_factory):
    """Every method once with 2 processes (one torchrun launch) and once in this process."""
    root = tmp_path_factory.mktemp("ddp")
    jobs = [[str(root / f"{m}_two"), [f"recipe=glue/rte_{m}", *COMMON, *extra]] for m, extra in PER_METHOD.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SELECTUNE_DATA": str(glue_root)}
    launch = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port=29400", str(Path(__file__).parent / "ddp_runs.py"), json.dumps(jobs)],
                            cwd=root, env=env, text=True, capture_output=True, timeout=600, check=False)
    assert launch.returncode == 0, launch.stderr[-3000:]
    from selectune.commands import train
    from selectune.config import compose

    old = os.environ.get("SELECTUNE_DATA")
    os.environ["SELECTUNE_DATA"] = str(glue_root)
    try:
        for m, extra in PER_METHOD.items():
            train(compose("train", [f"recipe=glue/rte_{m}", *COMMON, *extra]), root / f"{m}_one")
    finally:
        if old is None:
            os.environ.pop("SELECTUNE_DATA")
        else:
            os.environ["SELECTUNE_DATA"] = old
    return root


@pytest.mark.parametrize("method", list(PER_METHOD))
def test_two_processes_agree_with_each_other_and_with_one(method, runs):
    result = json.loads((runs / f"{method}_two" / "results.json").read_text())
    assert result["distributed"] == {"world": 2, "in_sync": True}  # parameters and masks equal on both ranks
    assert result["budget"] == json.loads((runs / f"{method}_one" / "results.json").read_text())["budget"]
    a, b = TaskDelta.load(runs / f"{method}_one").tensors, TaskDelta.load(runs / f"{method}_two").tensors
    if issubclass(METHODS[method], DiffPruning):  # hard-concrete noise is drawn per rank by design: the masks
        # differ, the count not
        assert TaskDelta(a).stored == TaskDelta(b).stored
        return
    assert set(a) == set(b)
    for key in a:
        if a[key].dtype == torch.int32:
            assert torch.equal(a[key], b[key]), key  # same masks
        else:
            assert torch.allclose(a[key], b[key], atol=2e-5, rtol=1e-4), (key, (a[key] - b[key]).abs().max())


def test_torchrun_needs_an_explicit_out_dir(data_env, tmp_path):
    result = torchrun("train", "recipe=glue/rte_full", *COMMON, "trainer.max_steps=1", cwd=tmp_path, port=29420)
    assert result.returncode != 0 and "pass out_dir=" in result.stderr


def test_resume_with_another_number_of_processes(data_env, tmp_path):
    """Start on one process, kill it after a checkpoint, finish on two: same delta as one uninterrupted run."""
    args = ["train", "recipe=glue/rte_lora", *COMMON, "task.max_train_examples=120", "trainer.epochs=2",
            "trainer.checkpoint_every=3"]
    whole = run_cli(*args, f"out_dir={tmp_path / 'whole'}", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    kill_after_first_checkpoint(args, tmp_path / "run", tmp_path)
    resumed = torchrun(*args, f"out_dir={tmp_path / 'run'}", "trainer.resume=true", cwd=tmp_path, port=29421)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    a, b = TaskDelta.load(tmp_path / "whole").tensors, TaskDelta.load(tmp_path / "run").tensors
    assert all(torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4) for k in a)
