"""`selectune export format=peft`: the adapter folder peft loads gives selectune's logits; other deltas refused."""

from __future__ import annotations

import json

import pytest
import torch

import selectune
from selectune.errors import SelectuneError

from conftest import compose_run, run_cli

pytest.importorskip("peft")

ADALORA = ("method.t_init=2", "method.t_final=5", "method.delta_t=2", "method.target_total=8", "trainer.lr=5e-3")


def dev_logits(run, out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dev logits of the bare base, of the base with the delta applied by selectune, and of
    PeftModel.from_pretrained(base, out)."""
    from omegaconf import OmegaConf
    from peft import PeftModel

    from selectune.commands import RunSpec, build, encode_splits
    from selectune.evaluation import predict
    from selectune.tasks import load_task

    delta = selectune.load_delta(run)
    spec = RunSpec.from_config(OmegaConf.create(delta.meta["config"]))
    task = load_task(spec.task)
    ours, _ = build(spec, task)
    theirs, _ = build(spec, task)  # the same seeded base; its fresh head is replaced by modules_to_save
    dev = encode_splits(task, ours, ["dev"])["dev"]
    cpu = torch.device("cpu")
    bare = torch.from_numpy(predict(ours.model, dev, 16, cpu))
    delta.apply(ours.model)
    peft_model = PeftModel.from_pretrained(theirs.model, out).eval()
    applied = torch.from_numpy(predict(ours.model, dev, 16, cpu))
    return bare, applied, torch.from_numpy(predict(peft_model, dev, 16, cpu))


@pytest.mark.parametrize(("recipe", "overrides", "peft_type"), [
    ("glue/mrpc_lora", ("trainer.lr=5e-3", "method.targets=[query,value,intermediate.dense]"), "LORA"),
    ("glue/rte_adalora", (*ADALORA, "method.trim=false"), "ADALORA"),
    ("glue/rte_adalora", ADALORA, "ADALORA"),  # the recipes' trimmed delta
])
def test_peft_adapter_gives_selectunes_logits(recipe, overrides, peft_type, data_env, tmp_path):
    from selectune.commands import train
    from selectune.export import export

    train(compose_run(recipe, "trainer.max_steps=20", *overrides), tmp_path / "run")
    report = export(str(tmp_path / "run"), str(tmp_path / "peft"), fmt="peft")
    assert report["format"] == "peft" and report["modules"] > 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and "classifier" in config["modules_to_save"]
    bare, ours, theirs = dev_logits(tmp_path / "run", tmp_path / "peft")
    assert (ours - bare).abs().max() > 1e-3  # the delta changes the logits: the parity below is not vacuous
    assert (ours - theirs).abs().max() <= 1e-5


def test_peft_format_refuses_sparse_and_spt_deltas(data_env, tmp_path):
    from selectune.commands import train

    train(compose_run("glue/rte_sara", "trainer.max_steps=1"), tmp_path / "run")
    result = run_cli("export", f"run={tmp_path / 'run'}", f"out={tmp_path / 'out'}", "format=peft", cwd=tmp_path)
    assert result.returncode != 0
    assert "format=peft holds LoRA and AdaLoRA deltas only; the sara delta stores indices, values" in result.stderr
    assert not (tmp_path / "out").exists()
    result = run_cli("export", f"run={tmp_path / 'run'}", f"out={tmp_path / 'out'}", "format=onnx", cwd=tmp_path)
    assert result.returncode != 0 and "format=onnx: use one of merged, peft" in result.stderr


def test_peft_kind_judges_the_stored_forms():
    from selectune.delta.taskdelta import TaskDelta
    from selectune.peft_export import peft_kind

    lora = {"w::lora_A": torch.ones(1, 2), "w::lora_B": torch.ones(2, 1), "w::lora_scale": torch.tensor(1.0)}
    head = {"classifier.weight::set": torch.ones(2, 2)}
    assert peft_kind(TaskDelta({**lora, **head}), frozenset({"classifier.weight"})) == "lora_A"
    with pytest.raises(SelectuneError, match="stores set"):  # BitFit-style dense base tensors
        peft_kind(TaskDelta({**lora, "b::set": torch.ones(2)}), frozenset({"classifier.weight"}))
    with pytest.raises(SelectuneError, match="adapter_down_bias"):
        peft_kind(TaskDelta({**lora, **{f"v::adapter_{k}": torch.ones(1) for k in
                                       ("down_weight", "down_bias", "up_weight", "up_bias")}}))
