"""The training loop end to end on tiny data: outputs, determinism, selection, eval, resume."""

from __future__ import annotations

import json

import pytest
import torch

from selectune.commands import evaluate_delta, train
from selectune.delta.taskdelta import TaskDelta

from conftest import TINY, compose_run, whole_and_resumed


def test_train_writes_results_delta_and_metrics(data_env, tmp_path):
    cfg = compose_run("glue/mrpc_lora", "trainer.epochs=2", "trainer.log_every=2")
    results = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    assert (run / "delta.safetensors").is_file() and (run / "config.yaml").is_file()
    assert not (run / "checkpoint").exists()  # removed once the run finished
    saved = json.loads((run / "results.json").read_text())
    assert saved["steps"] == 2 * 6 and saved["selection"] == "last" and saved["selected_step"] == 12
    assert set(saved["metrics"]["dev"]) == {"f1", "accuracy"}
    assert saved["budget"]["stored"] == TaskDelta.load(run).stored == results["budget"]["stored"]
    assert saved["delta_bytes"] == (run / "delta.safetensors").stat().st_size
    import numpy as np  # rows per predicted label of the kept evaluation: the collapse check, by label name

    predicted = saved["predictions"]["dev"]
    assert len(predicted) == 2 and all(type(n) is int for n in predicted.values())
    assert sum(predicted.values()) == len(np.load(run / "outputs_dev.npy"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" in r] == [6, 12]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 8, 10, 12] and logged[-1]["lr"] == 0.0
    assert all(r["examples_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in logged)
    meta = TaskDelta.load(run).meta
    assert meta["method"] == "lora" and meta["task"] == "mrpc" and meta["config"]["trainer"]["epochs"] == 2
    assert len(meta["base_hash"]) == 16 and meta["selectune_version"]


def test_stored_delta_evaluates_to_the_same_metrics(data_env, tmp_path):
    results = train(compose_run("glue/stsb_bitfit", "trainer.epochs=1"), tmp_path / "run")
    again = evaluate_delta(str(tmp_path / "run"), None, 16, "cpu")
    assert again["metrics"] == results["metrics"]
    scored = json.loads((tmp_path / "run" / "eval_stsb.json").read_text())
    assert scored["metrics"] == results["metrics"] and "predictions" not in scored  # regression: no classes


def test_same_seed_same_delta_other_seed_other_delta(data_env, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        train(compose_run("glue/rte_full", "trainer.max_steps=3", f"trainer.seed={seed}"), tmp_path / name)
    a, b, c = (TaskDelta.load(tmp_path / n).tensors for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_select_best_keeps_the_best_evaluation(data_env, tmp_path):
    results = train(compose_run("glue/cola_linear", "trainer.epochs=3", "trainer.select=best",
                                "trainer.lr=0.05"), tmp_path / "run")
    primary = [e["metrics"]["dev"]["matthews"] for e in results["evals"]]
    assert results["selection"] == "best"
    assert results["metrics"]["dev"]["matthews"] == max(primary)
    assert results["selected_step"] == results["evals"][primary.index(max(primary))]["step"]
    assert evaluate_delta(str(tmp_path / "run"), None, 16, "cpu")["metrics"] == results["metrics"]


def test_mnli_reports_matched_and_mismatched(data_env, tmp_path):
    results = train(compose_run("glue/mnli_linear", "trainer.max_steps=2"), tmp_path / "run")
    assert set(results["metrics"]) == {"dev_matched", "dev_mismatched"}


def test_resume_after_a_kill_matches_an_uninterrupted_run(data_env, tmp_path):
    """SIGKILL a run right after its first checkpoint, resume it, compare with a run never stopped."""
    args = ["train", "recipe=glue/rte_full", *TINY, "task.max_train_examples=160", "trainer.epochs=2",
            "trainer.eval_every=15", "trainer.checkpoint_every=5"]
    a, b = whole_and_resumed(args, tmp_path)
    assert a["evals"] == b["evals"] and a["metrics"] == b["metrics"]
    da, db = TaskDelta.load(tmp_path / "whole").tensors, TaskDelta.load(tmp_path / "killed").tensors
    assert all(torch.equal(da[k], db[k]) for k in da)
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    whole_steps = [json.loads(x)["step"] for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert steps == whole_steps  # records a killed run wrote after its checkpoint are not duplicated


class Stopped(Exception):
    """Ends a run between two checkpoints, as a kill would."""


def test_evaluation_time_is_kept_across_a_resume(data_env, tmp_path):
    """results.json says what the evaluations cost beside `train_time_s` (with a 10,000-image test split they are
    minutes of a run); a resumed run adds its own to what the checkpoint had."""
    from time import perf_counter

    from selectune import checkpoint

    args = ("trainer.max_steps=12", "trainer.eval_every=4")
    t0 = perf_counter()
    whole = train(compose_run("glue/rte_full", *args), tmp_path / "whole")
    wall = perf_counter() - t0
    assert whole["eval_time_s"] > 0 and whole["eval_time_s"] + whole["train_time_s"] < wall

    def stop(step: int, score: float) -> bool:
        if step == 8:  # step 4's checkpoint (after its evaluation) is on disk, step 8's is not
            raise Stopped
        return False

    with pytest.raises(Stopped):
        train(compose_run("glue/rte_full", *args), tmp_path / "run", on_eval=stop)
    kept = checkpoint.read(tmp_path / "run")
    assert kept["step"] == 4 and kept["eval_time"] > 0
    resumed = train(compose_run("glue/rte_full", *args, "trainer.resume=true"), tmp_path / "run")
    assert resumed["eval_time_s"] > kept["eval_time"] and resumed["evals"] == whole["evals"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["eval_time_s"] == resumed["eval_time_s"]


def test_resume_without_a_checkpoint_starts_the_records_over(data_env, tmp_path):
    """A run killed before its first checkpoint, resumed: metrics.jsonl holds one run's records, not two."""
    cfg = compose_run("glue/rte_full", "trainer.max_steps=4", "trainer.log_every=1")
    train(cfg, tmp_path / "whole")
    train(cfg, tmp_path / "run")
    for name in ("results.json", "delta.safetensors"):  # what a kill before the first checkpoint leaves out
        (tmp_path / "run" / name).unlink()
    assert not (tmp_path / "run" / "checkpoint").exists()
    train(compose_run("glue/rte_full", "trainer.max_steps=4", "trainer.log_every=1", "trainer.resume=true"),
          tmp_path / "run")
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(x)["step"] for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]


def test_resume_refuses_a_changed_config(data_env, tmp_path):
    cfg = compose_run("glue/rte_full", "trainer.max_steps=2")
    train(cfg, tmp_path / "run")
    (tmp_path / "run" / "results.json").unlink()
    from selectune.errors import SelectuneError

    with pytest.raises(SelectuneError, match="config differs"):
        train(compose_run("glue/rte_full", "trainer.max_steps=3", "trainer.resume=true"), tmp_path / "run")
