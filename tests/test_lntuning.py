"""LN-tuning: only the LayerNorm gains and biases train, they are stored whole and merge exactly."""

from __future__ import annotations

import pytest
import torch
from test_methods import attach, merged_and_trained_logits, train_steps

from selectune.delta.taskdelta import TaskDelta
from selectune.errors import SelectuneError

from conftest import compose_run


def test_ln_tuning_trains_the_layernorms_only_and_merges_exactly():
    backbone, method, before = attach("ln_tuning")
    norms = {n for n in before if "LayerNorm." in n}
    assert len(norms) == 2 * (1 + 2 * 2)  # embeddings + 2 per layer, gain and bias each
    assert set(method.trainable()) == norms | set(backbone.head_names)
    train_steps(method)
    for name, value in before.items():
        moved = not torch.equal(backbone.model.get_parameter(name), value)
        assert moved == (name in norms or name in backbone.head_names), name
    delta = TaskDelta(method.delta())
    delta.check()
    assert {k.rpartition("::")[2] for k in delta.tensors} == {"set"}
    assert set(delta.by_parameter()) == norms | set(backbone.head_names)
    merged, expected = merged_and_trained_logits(backbone, delta)
    assert torch.allclose(merged, expected, atol=1e-5)
    report = method.report()
    assert report.stored == report.trainable == 5 * 2 * 32 + report.head


def test_ln_tuning_sizes_itself(data_env, tmp_path):
    with pytest.raises(SelectuneError, match="takes no budget"):
        attach("ln_tuning", budget=1000)
    from selectune.commands import train

    results = train(compose_run("glue/rte_ln_tuning", "trainer.max_steps=2", "task.max_train_examples=16",
                                "task.max_eval_examples=8"), tmp_path / "run")
    assert results["method"] == "ln_tuning"
    assert results["budget"]["stored"] == results["budget"]["trainable"] == 5 * 2 * 64 + 64 * 2 + 2
