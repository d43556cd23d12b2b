"""Cheaper CPU steps: precision=auto, length-grouped batches, a run stopped at an evaluation, dev left unscored."""

from __future__ import annotations

import json

import pytest
import torch

from selectune.commands import train
from selectune.delta.taskdelta import TaskDelta
from selectune.tasks.batches import GROUP_BATCHES, train_batches
from selectune.trainer import resolve_precision

from conftest import compose_run


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("fp16", cpu) == "fp16"  # an explicit choice is kept


@pytest.mark.parametrize(("recipe", "precision"), [("glue/rte_lora", "auto"), ("causal/sst2_lora", "auto"),
                                                   ("vtab/dtd10_lora", "auto")])
def test_every_recipe_family_defaults_to_auto_precision(recipe, precision):
    from selectune.config import compose

    assert compose("train", [f"recipe={recipe}"]).trainer.precision == precision


def test_length_grouped_batches_cover_every_row_once_with_less_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 120, (1000,), generator=gen).tolist()
    plain = train_batches(1000, 8, seed=3, epoch=1)
    grouped = train_batches(1000, 8, seed=3, epoch=1, lengths=lengths)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert grouped == train_batches(1000, 8, seed=3, epoch=1, lengths=lengths)  # a resumed run replays them
    assert grouped != train_batches(1000, 8, seed=3, epoch=2, lengths=lengths)

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    assert padded(grouped) < 0.7 * padded(plain)  # uniform lengths: ~0.59
    # rows meet only within a window of GROUP_BATCHES batches of the epoch's shuffled order
    order = [i for b in train_batches(1000, 8 * GROUP_BATCHES, seed=3, epoch=1) for i in b]
    window = {i: order.index(i) // (8 * GROUP_BATCHES) for i in range(1000)}
    assert all(len({window[i] for i in b}) == 1 for b in grouped)


def test_group_by_length_trains_and_resumes_alike(data_env, tmp_path):
    a = train(compose_run("glue/mrpc_lora", "trainer.max_steps=4", "trainer.group_by_length=true"), tmp_path / "a")
    b = train(compose_run("glue/mrpc_lora", "trainer.max_steps=4", "trainer.group_by_length=true"), tmp_path / "b")
    assert a["metrics"] == b["metrics"] and a["steps"] == 4


def test_a_run_stopped_at_an_evaluation_is_finished_there(data_env, tmp_path):
    seen = []

    def on_eval(step: int, score: float) -> bool:
        seen.append((step, score))
        return True

    cfg = compose_run("glue/rte_lora", "trainer.epochs=3", "trainer.select=best", "task.validation=8",
                      "task.score_dev=false")
    results = train(cfg, tmp_path / "run", on_eval=on_eval)
    first = results["evals"][0]["step"]
    assert seen == [(first, results["evals"][0]["metrics"]["val"]["accuracy"])]
    assert results["stopped_at"] == first == results["steps"] and len(results["evals"]) == 1
    assert set(results["metrics"]) == {"val"}  # dev was not scored
    assert (tmp_path / "run" / "delta.safetensors").exists() and not (tmp_path / "run" / "checkpoint").exists()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["stopped_at"] == first


def test_a_sweep_is_told_only_of_evaluations_of_the_final_form(data_env, tmp_path):
    """Diff pruning's phase 1 is evaluated but not storable: a candidate stopped there could store nothing
    (select=best had no evaluation to keep: the run failed), and its scores are of a model not yet projected.
    on_eval hears from phase 2 only, and stopping at its first evaluation keeps that delta."""
    seen = []

    def on_eval(step: int, score: float) -> bool:
        seen.append(step)
        return True

    cfg = compose_run("glue/rte_sdiff", "trainer.max_steps=8", "trainer.eval_every=2", "method.phase1_share=0.5",
                      "trainer.select=best", "task.validation=8", "task.score_dev=false")
    results = train(cfg, tmp_path / "run", on_eval=on_eval)
    # phase 1 is steps 1-4, projected at the end of step 4: step 2's evaluation is phase 1's, step 4's the final form's
    assert [e["step"] for e in results["evals"]] == [2, 4]
    assert seen == [4] and results["stopped_at"] == 4 == results["selected_step"]
    assert (tmp_path / "run" / "delta.safetensors").exists()


def test_adalora_is_chosen_and_told_only_at_its_final_budget(data_env, tmp_path):
    """Before AdaLoRA's final mask (the last t_final steps) more than b(T) triplets are live: a delta stored then
    is over the budget. select=best keeps none of those evaluations and a sweep hears none of them, so the run's
    delta holds the kept triplets alone (trimmed: head + what they hold), even where an earlier score was better."""
    seen = []

    def on_eval(step: int, score: float) -> bool:
        seen.append(step)
        return False

    cfg = compose_run("glue/rte_adalora", "trainer.max_steps=12", "trainer.eval_every=2", "method.t_init=2",
                      "method.t_final=4", "method.delta_t=2", "method.target_total=4", "method.trim=true",
                      "trainer.select=best", "task.validation=8", "task.score_dev=false")
    results = train(cfg, tmp_path / "run", on_eval=on_eval)
    # the final mask is set at step 12 - 4 = 8: evaluations at 8, 10, 12 are at b(T)
    assert [(e["step"], e.get("storable", True)) for e in results["evals"]] == [
        (2, False), (4, False), (6, False), (8, True), (10, True), (12, True)]
    assert seen == [8, 10, 12] and results["selected_step"] in seen
    delta = TaskDelta.load(tmp_path / "run")
    assert delta.stored == results["budget"]["stored"] == results["budget"]["head"] + \
        results["method_state"]["final_kept_params"]
    assert sum(results["method_state"]["final_rank_pattern"].values()) == 4


def test_patience_counts_only_evaluations_of_a_storable_delta(data_env, tmp_path):
    """trainer.patience on AdaLoRA: lr ~0, so no evaluation beats the first. Counting the warm-up's evaluations,
    the run stopped at step 4 with nothing storable (select=best then failed the run); it stops at the second
    evaluation at b(T) instead, keeping the first."""
    cfg = compose_run("glue/rte_adalora", "trainer.max_steps=12", "trainer.eval_every=2", "method.t_init=2",
                      "method.t_final=4", "method.delta_t=2", "method.target_total=4", "trainer.lr=1e-12",
                      "trainer.patience=1", "trainer.select=best", "task.validation=8", "task.score_dev=false")
    results = train(cfg, tmp_path / "run")
    assert [e["step"] for e in results["evals"]] == [2, 4, 6, 8, 10]
    assert results["stopped_early"] == 10 and results["selected_step"] == 8


@pytest.mark.parametrize("value", ["bf32", "half"])
def test_an_unknown_precision_fails_at_config_time(data_env, tmp_path, value):
    from selectune.errors import SelectuneError

    with pytest.raises(SelectuneError, match="use auto, fp32"):
        train(compose_run("glue/rte_lora", f"trainer.precision={value}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["lora", "linear"])  # linear: the cached probe's stored dev features too
def test_a_bf16_run_is_scored_in_fp32_as_its_exported_delta_is(method, data_env, tmp_path):
    """Training under bf16 autocast; its evaluations are not: the stored outputs and metrics are those of the
    fp32 delta, as `selectune eval` (the delta merged into a fresh fp32 model) computes them."""
    import numpy as np

    import selectune
    from selectune.commands import RunSpec, build, encode_splits, evaluate_delta
    from selectune.evaluation import predict
    from selectune.tasks import load_task

    overrides = ["trainer.precision=bf16", "trainer.max_steps=3", "trainer.lr=1e-2", "task.max_eval_examples=16"]
    results = train(compose_run(f"glue/rte_{method}", *overrides), tmp_path / "run")
    assert results["precision"] == "bf16"
    spec = RunSpec.from_config(compose_run(f"glue/rte_{method}", *overrides))
    task = load_task(spec.task)
    backbone, _ = build(spec, task)
    bare = predict(backbone.model, encode_splits(task, backbone, ["dev"])["dev"], 16, torch.device("cpu"))
    selectune.load_delta(tmp_path / "run").apply(backbone.model)
    fresh = predict(backbone.model, encode_splits(task, backbone, ["dev"])["dev"], 16, torch.device("cpu"))
    stored = np.load(tmp_path / "run" / "outputs_dev.npy")
    assert np.abs(fresh - bare).max() > 1e-3  # the delta moved the outputs
    assert np.abs(fresh - stored).max() <= 1e-5  # scored under the autocast it was 3e-4 off here
    assert evaluate_delta(str(tmp_path / "run"), None, 16, "cpu", max_examples=16)["metrics"] == results["metrics"]
