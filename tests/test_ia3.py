"""IA³: what trains, the math of the scaled Linear, and its stored form merging exactly into a plain model."""

from __future__ import annotations

import pytest
import torch
from test_methods import attach, merged_and_trained_logits, tiny, train_steps

from selectune.delta.taskdelta import TaskDelta
from selectune.errors import SelectuneError
from selectune.methods.ia3 import IA3Linear


def test_the_scaled_linear_is_its_formula():
    torch.manual_seed(0)
    linear = torch.nn.Linear(5, 3)
    x = torch.randn(4, 5)
    out, inp = IA3Linear(linear, 0), IA3Linear(linear, 1)
    with torch.no_grad():
        assert torch.equal(out(x), linear(x)) and torch.equal(inp(x), linear(x))  # ones: the base model
        out.ia3_scale.copy_(torch.tensor([2.0, -1.0, 0.5]))
        inp.ia3_scale.copy_(torch.arange(1.0, 6.0))
    assert torch.allclose(out(x), (x @ linear.weight.T + linear.bias) * out.ia3_scale)
    assert torch.allclose(inp(x), (x * inp.ia3_scale) @ linear.weight.T + linear.bias)
    assert out.weight is linear.weight and out.bias is linear.bias  # names and storage kept


def test_ia3_scales_keys_values_and_the_feed_forward_input_and_merges_exactly():
    backbone, method, before = attach("ia3")
    trainable = set(method.trainable()) - set(backbone.head_names)
    layers = [f"bert.encoder.layer.{i}." for i in range(2)]
    assert trainable == {f"{p}{m}.ia3_scale" for p in layers
                         for m in ("attention.self.key", "attention.self.value", "output.dense")}
    assert method.wrapped[f"{layers[0]}output.dense"].axis == 1  # the FFN's second matrix: its input (64)
    assert method.wrapped[f"{layers[0]}output.dense"].ia3_scale.numel() == 64
    assert f"{layers[0]}attention.output.dense" not in method.wrapped
    assert set(backbone.base_parameters()) == set(before) - set(backbone.head_names)  # names unchanged
    train_steps(method)
    assert all(not torch.equal(p, torch.ones_like(p)) for n, p in method.trainable().items() if "ia3" in n)
    for name, value in before.items():  # the base weights never move
        if name not in backbone.head_names:
            assert torch.equal(backbone.model.get_parameter(name), value), name
    delta = TaskDelta(method.delta())
    delta.check()
    merged, expected = merged_and_trained_logits(backbone, delta)
    assert torch.allclose(merged, expected, atol=1e-5)
    report = method.report()
    vectors = 2 * (32 + 32 + 64)  # per layer: key and value outputs (32 each), the FFN input (64)
    assert report.trainable == vectors + report.head
    assert report.stored == vectors + 2 * (32 + 32) + report.head  # + the scaled key and value biases


def test_a_stored_ia3_delta_is_checked_like_any_other(tmp_path):
    backbone, method, _ = attach("ia3")
    delta = TaskDelta(method.delta())
    key = next(k for k in delta.tensors if k.endswith("::ia3_axis"))
    bad = dict(delta.tensors)
    bad[key] = torch.tensor(2.0)
    with pytest.raises(SelectuneError, match="ia3_axis' is 2.0, not 0 or 1"):
        TaskDelta(bad).check()
    short = dict(delta.tensors)
    scale = key.replace("ia3_axis", "ia3_scale")
    short[scale] = short[scale][:-1]
    with pytest.raises(SelectuneError, match="ia3_scale' has"):
        TaskDelta(short).check_fits(tiny().model)


def test_ia3_sizes_itself_and_needs_a_feed_forward_match():
    with pytest.raises(SelectuneError, match="takes no budget"):
        attach("ia3", budget=1000)
    with pytest.raises(SelectuneError, match="method.feedforward=.*matches no Linear"):
        attach("ia3", feedforward=["attention.output.dense"])
