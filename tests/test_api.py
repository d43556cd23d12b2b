"""The in-place API: apply / remove round trips on every stored form, refusals, head swaps, TaskSwitcher."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import selectune
from selectune.api import active, base_hash
from selectune.delta import forms
from selectune.delta.taskdelta import TaskDelta
from selectune.errors import SelectuneError

LAYER = "bert.encoder.layer.{}."


def tiny_bert(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (4, 10), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def random_delta(model, kind: str, seed: int, num_labels: int = 2, regression: bool = False) -> selectune.Delta:
    """A seeded random delta of one stored form (plus a head, as every method stores one)."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    hidden = model.config.hidden_size
    t: dict[str, torch.Tensor] = {
        "classifier.weight::set": torch.randn(num_labels, hidden, generator=gen),
        "classifier.bias::set": torch.randn(num_labels, generator=gen)}
    for layer in range(2):
        pre = LAYER.format(layer)
        if kind in ("sparse", "mixed"):
            for name in (pre + "attention.self.key.weight", pre + "output.LayerNorm.bias",
                         "bert.embeddings.word_embeddings.weight"):
                n = params[name].numel()
                idx = torch.randperm(n, generator=gen)[: max(1, n // 20)].sort().values.to(torch.int32)
                t[f"{name}::indices"], t[f"{name}::values"] = idx, torch.randn(idx.numel(), generator=gen) * 0.1
        if kind in ("lora", "mixed"):
            name = pre + "attention.self.query.weight"
            t[f"{name}::lora_A"] = torch.randn(4, hidden, generator=gen) * 0.1
            t[f"{name}::lora_B"] = torch.randn(hidden, 4, generator=gen) * 0.1
            t[f"{name}::lora_scale"] = torch.tensor(2.0)
        if kind in ("svd", "mixed"):
            name = pre + "attention.self.value.weight"
            t[f"{name}::svd_P"] = torch.randn(hidden, 3, generator=gen) * 0.1
            t[f"{name}::svd_E"] = torch.randn(3, generator=gen)
            t[f"{name}::svd_Q"] = torch.randn(3, hidden, generator=gen) * 0.1
            t[f"{name}::svd_scale"] = torch.tensor(0.5)
        if kind in ("dense", "mixed"):
            t[f"{pre}attention.output.dense.bias::set"] = torch.randn(hidden, generator=gen)
        if kind in ("adapter", "mixed"):
            name = pre + "intermediate.dense.weight"
            out = params[name].shape[0]
            t[f"{name}::adapter_down_weight"] = torch.randn(4, hidden, generator=gen) * 0.1
            t[f"{name}::adapter_down_bias"] = torch.randn(4, generator=gen) * 0.1
            t[f"{name}::adapter_up_weight"] = torch.randn(out, 4, generator=gen) * 0.1
            t[f"{name}::adapter_up_bias"] = torch.randn(out, generator=gen) * 0.1
    meta = {"base_hash": base_hash(model), "task": f"t{seed}", "method": kind, "config": {}}
    return selectune.Delta(t, meta)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_identical(model, before: dict[str, torch.Tensor]) -> None:
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    for name, value in before.items():
        assert after[name].shape == value.shape and torch.equal(after[name], value), name


KINDS_UNDER_TEST = ["sparse", "lora", "svd", "dense", "adapter", "mixed"]


@pytest.mark.parametrize("kind", KINDS_UNDER_TEST)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_apply_equals_export_merge_and_remove_restores_bits(kind, seed):
    model = tiny_bert()
    delta = random_delta(model, kind, seed)
    before, x = snapshot(model), batch(seed)
    with torch.no_grad():
        base_logits = model(**x).logits
    merged = copy.deepcopy(model)
    delta.apply_to(merged)  # what export / eval do: merge into a copy, attach Adapters
    delta.apply(model)
    changed = snapshot(model)
    for name, value in snapshot(merged).items():
        assert torch.equal(changed[name], value), name  # the same fp32 merge as export, bit for bit
    with torch.no_grad():
        assert torch.equal(model(**x).logits, merged(**x).logits)
        assert not torch.allclose(model(**x).logits, base_logits)
    assert active(model).delta is delta
    delta.remove(model)
    assert active(model) is None
    assert_bit_identical(model, before)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, base_logits)
    assert type(model.bert.encoder.layer[0].intermediate.dense) is torch.nn.Linear


def test_sparse_undo_holds_only_the_touched_entries():
    model = tiny_bert()
    delta = random_delta(model, "sparse", 0)
    delta.apply(model)
    entries = sum(t.numel() for k, t in delta.tensors.items() if k.endswith("::indices"))
    head = model.classifier.weight.numel() + model.classifier.bias.numel()
    assert active(model).held_bytes == 4 * (entries + head)  # fp32 base values at the touched entries + old head
    delta.remove(model)


def test_round_trip_through_a_file(tmp_path):
    model = tiny_bert()
    random_delta(model, "mixed", 3).save(tmp_path / "delta.safetensors")
    delta = selectune.load_delta(tmp_path)
    assert isinstance(delta, selectune.Delta)
    before = snapshot(model)
    delta.apply(model)
    delta.remove(model)
    assert_bit_identical(model, before)


def test_refuses_another_base():
    model, other = tiny_bert(seed=0), tiny_bert(seed=1)
    delta = random_delta(model, "sparse", 0)
    before = snapshot(other)
    with pytest.raises(SelectuneError, match="hash"):
        delta.apply(other)
    assert_bit_identical(other, before)
    assert active(other) is None


def test_refuses_a_stacked_delta_and_a_foreign_remove():
    model = tiny_bert()
    first, second = random_delta(model, "lora", 0), random_delta(model, "sparse", 1)
    first.apply(model)
    applied = snapshot(model)
    with pytest.raises(SelectuneError, match="already carries delta 't0_lora'"):
        second.apply(model)
    with pytest.raises(SelectuneError, match="carries delta 't0_lora'"):
        second.remove(model)
    assert_bit_identical(model, applied)
    first.remove(model)
    with pytest.raises(SelectuneError, match="carries no delta"):
        first.remove(model)


def test_a_bad_entry_changes_nothing():
    model = tiny_bert()
    delta = random_delta(model, "mixed", 0)
    delta.tensors[LAYER.format(1) + "attention.self.key.weight::indices"][-1] = 10**6
    before = snapshot(model)
    with pytest.raises(SelectuneError, match="indices outside"):
        delta.apply(model)
    assert_bit_identical(model, before)
    assert active(model) is None


@pytest.mark.parametrize("num_labels", [3, 1])
def test_head_swap_to_another_label_count(num_labels):
    model = tiny_bert(num_labels=2)
    delta = random_delta(model, "sparse", 0, num_labels=num_labels)
    delta.meta["config"] = {"task": {"family": "glue", "name": "mnli" if num_labels == 3 else "stsb"}}
    before, config_before = snapshot(model), model.config.to_dict()
    delta.apply(model)
    with torch.no_grad():
        assert model(**batch()).logits.shape == (4, num_labels)
    assert model.config.num_labels == num_labels == model.num_labels == model.classifier.out_features
    assert model.config.problem_type == ("regression" if num_labels == 1 else "single_label_classification")
    delta.remove(model)
    assert_bit_identical(model, before)
    assert model.config.to_dict() == config_before and model.num_labels == 2
    assert model(**batch()).logits.shape == (4, 2)


def test_indices_and_values_of_other_lengths_are_refused():
    model = tiny_bert()
    delta = random_delta(model, "sparse", 0)
    key = LAYER.format(0) + "attention.self.key.weight::values"
    delta.tensors[key] = delta.tensors[key][:-1]
    with pytest.raises(SelectuneError, match="indices but"):
        delta.apply(model)
    assert active(model) is None


def test_a_base_tensor_of_another_shape_is_refused():
    model = tiny_bert()
    delta = random_delta(model, "dense", 0)
    delta.tensors[LAYER.format(0) + "attention.output.dense.bias::set"] = torch.zeros(5)
    with pytest.raises(SelectuneError, match="shape"):
        delta.apply(model)
    assert active(model) is None


def test_task_switcher():
    model = tiny_bert()
    before, x = snapshot(model), batch()
    deltas = {f"task{i}": random_delta(model, kind, i) for i, kind in enumerate(["sparse", "lora", "adapter"])}
    expected = {}
    for name, delta in deltas.items():
        merged = copy.deepcopy(model)
        delta.apply_to(merged)
        with torch.no_grad():
            expected[name] = merged(**x).logits
    switcher = selectune.TaskSwitcher(model, deltas)
    assert switcher.active is None
    for name in ["task0", "task2", "task1", "task1", "task0"]:
        switcher.switch(name)
        assert switcher.active == name
        with torch.no_grad():
            assert torch.equal(model(**x).logits, expected[name])
    switcher.clear()
    assert switcher.active is None
    assert_bit_identical(model, before)
    with pytest.raises(SelectuneError, match="no task 'nope'"):
        switcher.switch("nope")


def test_switcher_refuses_a_delta_for_another_base():
    model = tiny_bert()
    with pytest.raises(SelectuneError, match="hash"):
        selectune.TaskSwitcher(model, {"x": random_delta(tiny_bert(seed=5), "lora", 0)})


def test_the_registry_is_what_a_delta_accepts():
    """The forms registry is the one list of stored kinds: TaskDelta knows exactly its kinds."""
    kinds = forms.kinds()
    assert len(kinds) == len(set(kinds)) and set(forms.value_kinds()) <= set(kinds)
    assert {"set", "indices", "values", "lora_A", "svd_P", "adapter_up_weight"} <= set(kinds)
    assert set(TaskDelta({f"w::{k}": torch.zeros(1) for k in kinds}).by_parameter()["w"]) == set(kinds)
    with pytest.raises(SelectuneError, match="unknown entry 'w::bogus'"):
        TaskDelta({"w::bogus": torch.zeros(1)}).by_parameter()
    with pytest.raises(ValueError, match="clash"):
        forms.register(forms.LowRank())


def test_merge_into_dispatches_through_the_registry():
    model = tiny_bert()
    delta = TaskDelta(random_delta(model, "svd", 0).tensors)
    expected = snapshot(model)
    name = LAYER.format(0) + "attention.self.value.weight"
    parts = delta.by_parameter()[name]
    expected[name] = expected[name] + (parts["svd_P"] * parts["svd_E"]) @ parts["svd_Q"] * 0.5
    delta.merge_into(model)
    torch.testing.assert_close(model.get_parameter(name), expected[name], rtol=0, atol=1e-6)


def test_import_selectune_stays_light_and_names_the_api():
    import subprocess
    import sys

    code = ("import sys, selectune; assert 'torch' not in sys.modules; "
            "assert callable(selectune.load_delta) and selectune.TaskSwitcher and selectune.Delta; "
            "assert 'torch' in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        selectune.nope  # noqa: B018
