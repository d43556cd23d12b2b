"""The stored forms own their storage: whether they merge (a form that cannot makes export refuse, whatever
its name), their dtypes, their compaction, and the one fit check merge, export, eval and apply share."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_methods import attach, tiny

from selectune.api import Delta
from selectune.delta import forms
from selectune.delta.taskdelta import TaskDelta
from selectune.errors import SelectuneError

from conftest import REPO, compose_run

# A module-like form no method ships: a per-row shift added after a nonlinearity, so not a weight change.
SHIFT_FORM = '''
import torch
from selectune.delta import forms

class RowShift(forms.Form):
    marker, dims, value_kinds, merges = "row_shift", {"row_shift": 1}, ("row_shift",), False

    def apply(self, model, name, parts):
        raise NotImplementedError

forms.register(RowShift())
'''


@pytest.fixture
def row_shift():
    """RowShift registered for this test only."""
    namespace: dict = {}
    exec(SHIFT_FORM, namespace)  # the test's own source, above
    yield namespace["RowShift"]
    forms.FORMS.pop("row_shift")


@pytest.fixture
def shifted_run(data_env, tmp_path, row_shift) -> Path:
    """A finished tiny BitFit run whose delta also holds a RowShift group."""
    from selectune.commands import train

    run = tmp_path / "run"
    train(compose_run("glue/rte_bitfit", "trainer.max_steps=1", "task.max_train_examples=8",
                      "task.max_eval_examples=8"), run)
    delta = TaskDelta.load(run)
    delta.tensors["bert.encoder.layer.0.output.dense.weight::row_shift"] = torch.zeros(64)
    delta.save(run / "delta.safetensors")
    return run


def test_a_form_that_cannot_merge_makes_export_refuse_in_one_line(shifted_run, tmp_path):
    from selectune.export import export

    out = tmp_path / "hf"
    with pytest.raises(SelectuneError, match=r"cannot export .*: 1 weights hold RowShift entries, a form that "
                                             r"cannot be merged into weights") as err:
        export(str(shifted_run), str(out))
    assert "\n" not in str(err.value) and not out.exists()
    from omegaconf import OmegaConf

    from selectune.backbone import load_backbone
    from selectune.runspec import RunSpec

    delta = TaskDelta.load(shifted_run)
    model = load_backbone(RunSpec.from_config(OmegaConf.create(delta.meta["config"])).model, 2, False, None, 0).model
    assert list(delta.unmerged()) == ["bert.encoder.layer.0.output.dense.weight"]
    with pytest.raises(SelectuneError, match=r"^task delta: 1 weights hold RowShift entries .* cannot be merged"):
        TaskDelta(delta.tensors, delta.meta).merge_into(model)


def test_the_cli_export_of_a_form_that_cannot_merge_exits_2_with_one_line(shifted_run, tmp_path):
    """The real CLI in a process where the form is registered (as a plugin module would register it)."""
    out = tmp_path / "hf"
    code = (SHIFT_FORM + "import sys\nfrom selectune.cli import main\n"
            f"sys.argv = ['selectune', 'export', 'run={shifted_run}', 'out={out}']\nmain()\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True, capture_output=True,
                            timeout=300, check=False)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("selectune: error: cannot export") and "RowShift" in lines[0], lines[0]
    assert not out.exists()


def test_dtypes_per_form_and_ia3_s_integer_axis(tmp_path):
    """Each form says which of its kinds are integers (and in which dtypes); everything else is floating
    point. IA³ writes its axis as int32; a file from before, with a float axis, still reads (as int32)."""
    integer = {form.marker: {k: v for k, v in form.dtypes.items() if k in form.kinds or k in form.compact_kinds}
               for form in forms.registered().values()}
    assert integer == {"set": {}, "indices": {"indices": forms.INDEX_DTYPES, "index_gaps": forms.GAP_DTYPES},
                       "svd_P": {}, "lora_A": {}, "ia3_scale": {"ia3_axis": integer["ia3_scale"]["ia3_axis"]},
                       "adapter_up_weight": {}}
    _, method, _ = attach("ia3")
    delta = TaskDelta(method.delta(), {"config": {}, "base_hash": "x", "method": "ia3"})
    axes = {k: t for k, t in delta.tensors.items() if k.endswith("::ia3_axis")}
    assert axes and all(t.dtype == torch.int32 and t.dim() == 0 for t in axes.values())
    delta.save(tmp_path / "new.safetensors")
    legacy = TaskDelta({k: (t.float() if k in axes else t) for k, t in delta.tensors.items()}, delta.meta)
    legacy.save(tmp_path / "old.safetensors")
    for name in ("new", "old"):
        back = TaskDelta.load(tmp_path / f"{name}.safetensors")
        assert all(back.tensors[k].dtype == torch.int32 and torch.equal(back.tensors[k], t) for k, t in axes.items())
    bad = dict(delta.tensors)
    bad[next(iter(axes))] = torch.tensor(0.5)
    TaskDelta(bad, delta.meta).save(tmp_path / "half.safetensors")
    with pytest.raises(SelectuneError, match=r"is damaged: '.*::ia3_axis' is 0.5, not 0 or 1"):
        TaskDelta.load(tmp_path / "half.safetensors")
    bad[next(iter(axes))] = torch.tensor(1.0, dtype=torch.float64)
    TaskDelta(bad, delta.meta).save(tmp_path / "f64.safetensors")
    with pytest.raises(SelectuneError, match=r"ia3_axis' has dtype torch.float64 \(expected torch.int32 or"):
        TaskDelta.load(tmp_path / "f64.safetensors")


def test_compaction_is_each_form_s_own(tmp_path):
    """Sparse entries compact to gaps and half values; every other form's group is written as it is."""
    _, method, _ = attach("ia3")
    tensors = {**method.delta(), "bert.encoder.layer.0.output.dense.bias::indices": torch.tensor([0, 3, 70000]),
               "bert.encoder.layer.0.output.dense.bias::values": torch.tensor([0.5, -1.0, 2.0])}
    TaskDelta(tensors, {"config": {}, "base_hash": "x", "method": "ia3"}).save(tmp_path / "c.safetensors",
                                                                              compact="float16")
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / "c.safetensors"))
    sparse = "bert.encoder.layer.0.output.dense.bias"
    assert raw[f"{sparse}::index_gaps"].dtype == torch.int32 and raw[f"{sparse}::values"].dtype == torch.float16
    assert f"{sparse}::indices" not in raw
    assert all(raw[k].dtype == t.dtype for k, t in tensors.items() if not k.startswith(sparse))
    back = TaskDelta.load(tmp_path / "c.safetensors")
    assert back.tensors[f"{sparse}::indices"].tolist() == [0, 3, 70000]
    assert back.tensors[f"{sparse}::indices"].dtype == torch.int32


def test_one_fit_check_for_merge_and_apply():
    """The in-place apply and merge (export, eval) refuse a misfit with the same line: one check."""
    _, method, _ = attach("ia3")
    tensors = dict(method.delta())
    key = next(k for k in tensors if k.endswith("::ia3_scale"))
    tensors[key] = tensors[key][:-1]
    meta = {"config": {}, "base_hash": "x", "method": "ia3"}
    messages = []
    for use in (lambda m: TaskDelta(tensors, meta).merge_into(m), lambda m: Delta(tensors, meta).apply(m, force=True),
                lambda m: TaskDelta(tensors, meta).apply_to(m)):
        model = tiny().model
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with pytest.raises(SelectuneError) as err:
            use(model)
        messages.append(str(err.value))
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert len(set(messages)) == 1 and "ia3_scale' has" in messages[0], messages
