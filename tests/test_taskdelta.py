"""The TaskDelta file: round trip, metadata, and every way a file can be wrong."""

from __future__ import annotations

import json

import pytest
import torch

from selectune.delta.taskdelta import TaskDelta
from selectune.errors import SelectuneError


def sample() -> TaskDelta:
    return TaskDelta({"classifier.weight::set": torch.randn(2, 4), "enc.q.weight::lora_A": torch.randn(2, 4),
                      "enc.q.weight::lora_B": torch.randn(4, 2), "enc.q.weight::lora_scale": torch.tensor(2.0)},
                     {"base_model": "m", "base_hash": "abc", "method": "lora", "config": {}})


def test_round_trip(tmp_path):
    delta = sample()
    size = delta.save(tmp_path / "d.safetensors")
    assert size == (tmp_path / "d.safetensors").stat().st_size
    back = TaskDelta.load(tmp_path / "d.safetensors")
    assert back.meta == delta.meta
    assert all(torch.equal(back.tensors[k], v) for k, v in delta.tensors.items())
    assert back.stored == 8 + 8 + 8  # the scale is not a stored value
    assert not list(tmp_path.glob("*.tmp"))


def test_loading_a_run_dir(tmp_path):
    sample().save(tmp_path / "delta.safetensors")
    assert TaskDelta.load(tmp_path).meta["method"] == "lora"


def test_merge_applies_set_and_low_rank():
    model = torch.nn.Module()
    model.classifier = torch.nn.Linear(4, 2)
    model.enc = torch.nn.Module()
    model.enc.q = torch.nn.Linear(4, 4)
    w0 = model.enc.q.weight.detach().clone()
    delta = sample()
    delta.merge_into(model)
    assert torch.equal(model.classifier.weight, delta.tensors["classifier.weight::set"])
    expected = w0 + 2.0 * delta.tensors["enc.q.weight::lora_B"] @ delta.tensors["enc.q.weight::lora_A"]
    assert torch.allclose(model.enc.q.weight, expected)


def test_truncated_file(tmp_path):
    sample().save(tmp_path / "d.safetensors")
    data = (tmp_path / "d.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SelectuneError, match="truncated or corrupted"):
        TaskDelta.load(tmp_path / "t.safetensors")


def test_garbage_file(tmp_path):
    (tmp_path / "g.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(SelectuneError, match="truncated or corrupted"):
        TaskDelta.load(tmp_path / "g.safetensors")


def test_a_plain_safetensors_file_is_not_a_delta(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(SelectuneError, match="not a selectune task delta"):
        TaskDelta.load(tmp_path / "w.safetensors")


def test_corrupted_metadata(tmp_path):
    from safetensors.torch import save_file

    save_file({"w::set": torch.zeros(2)}, str(tmp_path / "m.safetensors"),
              metadata={"format": "selectune.taskdelta/1", "selectune": "{not json"})
    with pytest.raises(SelectuneError, match="metadata is missing or corrupted"):
        TaskDelta.load(tmp_path / "m.safetensors")


def test_unknown_entry_kind(tmp_path):
    from safetensors.torch import save_file

    meta = {"base_hash": "abc", "method": "lora", "config": {}}
    save_file({"w::weird": torch.zeros(2)}, str(tmp_path / "k.safetensors"),
              metadata={"format": "selectune.taskdelta/1", "selectune": json.dumps(meta)})
    with pytest.raises(SelectuneError, match="unknown entry 'w::weird'"):
        TaskDelta.load(tmp_path / "k.safetensors")


def test_missing_file(tmp_path):
    with pytest.raises(SelectuneError, match="no task delta at"):
        TaskDelta.load(tmp_path / "nope")


def test_delta_for_another_model_shape():
    model = torch.nn.Module()
    model.classifier = torch.nn.Linear(8, 2)
    model.enc = torch.nn.Module()
    model.enc.q = torch.nn.Linear(4, 4)
    with pytest.raises(SelectuneError, match="has shape .* another base model"):
        sample().merge_into(model)


def test_delta_for_another_model_names():
    model = torch.nn.Module()
    model.head = torch.nn.Linear(4, 2)
    with pytest.raises(SelectuneError, match="does not have"):
        sample().merge_into(model)
