"""Refusals that change nothing, one test per mechanism (issue 36), each through the real CLI or the public API.

1. Hydra writes nothing before selectune's checks: `.hydra/` is written by selectune once a run proceeds,
   probe is staged like train and holds the run lock, `hydra.*` overrides that move output are mapped onto
   out_dir or refused, and a refused train, resume, probe or sweep leaves every folder byte-identical.
2. `Delta.apply` is all-or-nothing: checked before the first write, undone on any failure; `remove` works
   after a dtype move.
4. A delta file does not decide the model's size, the data it is scored on, or non-finite weights.
5. One line instead of a traceback for what used to print one.
Each CLI case asserts the exit code, one output line, and a watched scratch root byte-identical.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from watch import R, cli, one_line, tree

import selectune
from selectune.api import active, base_hash
from selectune.errors import SelectuneError

from conftest import TINY


@pytest.fixture(scope="module")
def made(glue_root, tmp_path_factory) -> Path:
    """A finished 2-job sweep (its job 0 is the finished run the tests use) and a finished probe."""
    root = tmp_path_factory.mktemp("made")
    result = cli("train", "-m", *R, "trainer.seed=1,2", "hydra.sweep.dir=sweep", cwd=root, data=glue_root)
    assert result.returncode == 0, result.stderr
    result = cli("probe", *R, "probe.batches=2", "out_dir=probe", cwd=root, data=glue_root)
    assert result.returncode == 0, result.stderr
    assert (root / "sweep" / "0_rte_bitfit" / ".hydra" / "config.yaml").is_file()
    assert (root / "probe" / ".hydra" / "config.yaml").is_file() and (root / "probe" / "probe.log").is_file()
    return root


@pytest.fixture
def scratch(made, tmp_path) -> Path:
    """A copy of the made folders to run refusals in (cwd and temp folder of the command)."""
    root = tmp_path / "root"
    shutil.copytree(made, root, symlinks=True)
    (root / ".tmp").mkdir(exist_ok=True)
    return root


def refused(scratch: Path, data: Path, args: list[str], *patterns: str) -> str:
    """Run a command that must be refused: one line, exit 2, and the whole scratch root byte-identical."""
    before = tree(scratch)
    line = one_line(cli(*args, cwd=scratch, data=data), *patterns)
    assert tree(scratch) == before
    return line


# --------------------------------------------------------------------------- 1. Hydra writes before selectune
def test_probe_through_a_linked_hydra_folder_writes_nothing(glue_root, scratch):
    """`d/.hydra` -> another run's .hydra: that run's config.yaml stays as it is."""
    (scratch / "d").mkdir()
    (scratch / "d" / ".hydra").symlink_to(scratch / "sweep" / "0_rte_bitfit" / ".hydra")
    refused(scratch, glue_root, ["probe", *R, "out_dir=d"], "symbolic link")


@pytest.mark.parametrize(("override", "expected"), [
    ("hydra.run.dir=sweep/0_rte_bitfit", "already holds a finished run"),  # mapped onto out_dir: refused there
    ("hydra.output_subdir=elsewhere", "hydra.output_subdir moves where Hydra writes"),
    ("hydra.sweep.subdir=x", "hydra.sweep.subdir moves where Hydra writes"),
    ("hydra.job.chdir=true", "hydra.job.chdir moves where Hydra writes"),
])
def test_hydra_output_overrides_are_mapped_or_refused(glue_root, scratch, override, expected):
    refused(scratch, glue_root, ["train", *R, override], expected)


def test_hydra_run_dir_and_out_dir_naming_two_folders(glue_root, scratch):
    refused(scratch, glue_root, ["train", *R, "hydra.run.dir=a", "out_dir=b"], "name two run folders")
    refused(scratch, glue_root, ["eval", "run=sweep/0_rte_bitfit", "hydra.output_subdir=x"], "moves where Hydra")


def test_hydra_run_dir_trains_in_that_folder(glue_root, scratch):
    result = cli("train", *R, "hydra.run.dir=mapped", cwd=scratch, data=glue_root)
    assert result.returncode == 0, result.stderr
    assert (scratch / "mapped" / "results.json").is_file() and (scratch / "mapped" / ".hydra").is_dir()
    assert not (scratch / "runs").exists() and not list((scratch / ".tmp").glob("selectune-stage-*"))


def test_a_refused_sweep_rewrites_nothing(glue_root, scratch):
    """Both jobs refused (finished runs): multirun.yaml and each job's .hydra/ and train.log stay."""
    before = tree(scratch)
    result = cli("train", "-m", *R, "trainer.seed=1,2", "hydra.sweep.dir=sweep", cwd=scratch, data=glue_root)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("selectune: error: ")]
    assert len(errors) == 2 and all("already holds a finished run" in e for e in errors), result.stderr
    assert tree(scratch) == before


def test_a_sweep_whose_every_job_is_refused_leaves_no_folder(scratch):
    """Hydra makes runs/multirun/<time>/multirun.yaml before any job is checked: no job ran, so it goes."""
    before = tree(scratch)
    result = cli("train", "-m", *R, "trainer.seed=1,2", cwd=scratch, data=scratch / "nodata")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("selectune: error: ")]
    assert len(errors) == 2 and all("RTE data not found" in e for e in errors), result.stderr
    assert tree(scratch) == before


def _damaged_resume(run: Path, how: str) -> None:
    """An unfinished run from a finished one (no results.json, no delta) with a checkpoint damaged `how`."""
    for name in ("results.json", "delta.safetensors"):
        (run / name).unlink()
    folder = run / "checkpoint"
    folder.mkdir()
    if how == "garbage":
        (folder / "state.pt").write_bytes(b"not a checkpoint")
    elif how == "step":
        state = {"step": 10**6, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "scaler": {},
                 "method": {}, "evals": [], "best": None, "delta_bytes": None, "train_time": 0.0,
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
        torch.save(state, folder / "state.pt")
    # "no_state": the folder alone


@pytest.mark.parametrize(("how", "expected"), [
    ("garbage", "state.pt cannot be read"),
    ("no_state", "state.pt cannot be read"),
    ("step", "its step 1000000 is not below this run's 2 steps"),
])
def test_a_refused_resume_rewrites_nothing(glue_root, scratch, how, expected):
    """Before: .hydra/ replaced, config.yaml's resume flipped, train.log appended; a checkpoint/ without
    state.pt restarted at step 0; an impossible step wrote the delta, then an IndexError."""
    run = scratch / "sweep" / "0_rte_bitfit"
    _damaged_resume(run, how)
    args = yaml.safe_load(run.joinpath(".hydra", "overrides.yaml").read_text())  # the run's own overrides
    refused(scratch, glue_root, ["train", *args, f"out_dir={run}", "trainer.resume=true"],
            "checkpoint at", "is damaged", expected)


def test_probe_honours_the_run_lock(glue_root, scratch):
    folder = scratch / "locked"
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused(scratch, glue_root, ["probe", *R, "probe.batches=2", f"out_dir={folder}"],
                f"is in use by pid {os.getpid()}")
    finally:
        os.close(fd)


def test_probe_and_train_refuse_each_others_finished_folders(glue_root, scratch):
    refused(scratch, glue_root, ["probe", *R, "probe.batches=2", "out_dir=sweep/0_rte_bitfit"],
            "holds a training run (results.json)")
    refused(scratch, glue_root, ["train", *R, "out_dir=probe"], "holds a probe (summary.json)")


# --------------------------------------------------------------------------- 2. apply is all-or-nothing
def tiny_bert(num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def bits(model) -> dict[str, bytes]:
    """Every parameter's exact bytes (and dtype, shape): what "bit-identical" compares."""
    return {n: (str(p.dtype), tuple(p.shape), p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            for n, p in model.named_parameters()}


def head_delta(model, weight: tuple[int, ...], bias: tuple[int, ...], task: str | None = None) -> selectune.Delta:
    """A delta that also moves one body tensor (so a half-applied delta would show), with the given head."""
    body = "bert.encoder.layer.0.output.dense.bias"
    tensors = {"classifier.weight::set": torch.randn(*weight), "classifier.bias::set": torch.randn(*bias),
               f"{body}::set": torch.randn(model.get_parameter(body).shape)}
    config = {"task": {"name": task, "family": "glue"}} if task else {}
    return selectune.Delta(tensors, {"base_hash": base_hash(model), "task": task or "t", "method": "x",
                                     "config": config})


@pytest.mark.parametrize(("weight", "bias", "task", "expected"), [
    ((16,), (2,), None, "head weight 'classifier.weight' has shape (16,)"),
    ((3, 16), (2,), None, "head bias 'classifier.bias' has shape (2,) for a weight of 3 rows"),
    ((2, 100), (2,), None, "takes 16 inputs"),
    ((3, 16), (3,), "rte", "its task has 2 outputs but the head it leaves has 3 rows"),
    ((2, 16), (2,), "mnli", "its task has 3 outputs but the head it leaves has 2 rows"),
])
def test_a_refused_apply_leaves_the_base_bit_identical(tmp_path, weight, bias, task, expected):
    model = tiny_bert()
    delta = head_delta(model, weight, bias, task)
    delta.save(tmp_path / "d.safetensors")
    loaded = selectune.load_delta(tmp_path / "d.safetensors")  # loading passes: the shapes fit no model yet
    before = bits(model)
    with pytest.raises(SelectuneError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        loaded.apply(model)
    assert bits(model) == before and active(model) is None
    assert model.classifier.out_features == 2


def test_a_failure_inside_apply_is_undone(monkeypatch):
    """A group that fails half-way (its Parameter swapped, no undo returned) is put back too."""
    from selectune.delta import forms

    model = tiny_bert()
    delta = head_delta(model, (3, 16), (3,), "mnli")
    before = bits(model)
    real = forms.DenseSet.apply

    def swap_then_fail(self, model, name, parts):
        if name == "classifier.bias":
            real(self, model, name, parts)
            raise RuntimeError("injected failure after the swap")
        return real(self, model, name, parts)

    monkeypatch.setattr(forms.DenseSet, "apply", swap_then_fail)
    with pytest.raises(SelectuneError, match="cannot apply delta .*injected failure.*the model is unchanged"):
        delta.apply(model)
    assert bits(model) == before and active(model) is None and model.classifier.out_features == 2


def test_a_refused_switch_keeps_the_previous_task():
    model = tiny_bert()
    base = bits(model)
    good = head_delta(model, (3, 16), (3,), "mnli")
    switcher = selectune.TaskSwitcher(model, {"mnli": good, "bad": head_delta(model, (3, 16), (2,))})
    switcher.switch("mnli")
    applied = bits(model)
    with pytest.raises(SelectuneError, match="for a weight of 3 rows"):
        switcher.switch("bad")
    assert switcher.active == "mnli" and bits(model) == applied
    switcher.clear()
    assert bits(model) == base


def test_remove_after_a_dtype_move():
    model = tiny_bert()
    delta = head_delta(model, (3, 16), (3,), "mnli")
    expected = bits(tiny_bert().half())
    delta.apply(model)
    model.half()
    delta.remove(model)
    assert bits(model) == expected and model.classifier.out_features == 2 and active(model) is None


# --------------------------------------------------------------------------- 4. what a delta file may decide
def _rewrite_delta(path: Path, change_meta=None, add: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    meta = json.loads(header["selectune"])
    if change_meta is not None:
        change_meta(meta)
    save_file({**tensors, **(add or {})}, str(path), metadata={**header, "selectune": json.dumps(meta)})


def test_a_delta_cannot_ask_for_a_huge_random_model(glue_root, scratch):
    delta = scratch / "sweep" / "0_rte_bitfit" / "delta.safetensors"
    _rewrite_delta(delta, lambda m: m["config"]["model"]["config_overrides"].update(
        hidden_size=2**16, intermediate_size=2**18, num_hidden_layers=64))
    refused(scratch, glue_root, ["eval", f"run={delta}"], "parameters", "more than this machine's", "free memory")


def test_a_delta_cannot_pick_the_data_it_is_scored_on(glue_root, scratch):
    """Its metadata's task.data_root (an empty folder here) is ignored: SELECTUNE_DATA decides."""
    run = scratch / "sweep" / "0_rte_bitfit"
    (scratch / "planted").mkdir()
    _rewrite_delta(run / "delta.safetensors",
                   lambda m: m["config"]["task"].update(data_root=str(scratch / "planted")))
    result = cli("eval", f"run={run}", cwd=scratch, data=glue_root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("rte · bitfit · dev 48 examples (whole split) · dev: accuracy") and json.loads(
        (run / "eval_rte.json").read_text())["task"] == "rte"


def test_factors_that_overflow_when_multiplied_are_refused(glue_root, scratch):
    delta = scratch / "sweep" / "0_rte_bitfit" / "delta.safetensors"
    name = "bert.encoder.layer.0.attention.self.query.weight"
    _rewrite_delta(delta, add={f"{name}::lora_A": torch.full((2, 64), 1e20),
                               f"{name}::lora_B": torch.full((64, 2), 1e20), f"{name}::lora_scale": torch.tensor(1.0)})
    refused(scratch, glue_root, ["eval", f"run={delta}"], "multiply to 4096 NaN or infinite values")
    refused(scratch, glue_root, ["export", f"run={delta}", "out=exported"], "multiply to 4096 NaN or infinite")


# --------------------------------------------------------------------------- 5. one line, not a traceback
def test_own_recipe_files_that_break(glue_root, scratch):
    own = scratch / "own" / "recipe" / "mine"
    own.mkdir(parents=True)
    (own / "broken.yaml").write_text("defaults:\n  - override /task: glue/rte\n foo: [\n")
    (own / "resolver.yaml").write_text("run_name: ${nosuch:x}\n")
    search = f"hydra.searchpath=[file://{scratch / 'own'}]"
    refused(scratch, glue_root, ["train", "recipe=mine/broken", search, *TINY], "broken.yaml:3: not valid YAML")
    refused(scratch, glue_root, ["train", "recipe=mine/resolver", search, *TINY],
            "Unsupported interpolation type nosuch")
    refused(scratch, glue_root, ["train", *R, "run_name=${run_name}"], "config key 'run_name'", "Recursive")


@pytest.mark.parametrize(("args", "expected"), [
    (["train", "glue/rte_bitfit", "trainer.lr=-1"], "trainer.lr must be positive"),  # positional recipe
    (["train"], "which recipe? selectune train recipe=<recipe>"),
    (["train", "model=tiny_random"], "which recipe?"),
    (["eval", "run=sweep/0_rte_bitfit", "task=glue/rtee"], "unknown task 'glue/rtee': did you mean glue/rte"),
    (["eval", "run=sweep/0_rte_bitfit", "foo=1"], "unknown config key 'foo'"),
    (["export", "run=sweep/0_rte_bitfit", "out=e", "foo=1"], "unknown config key 'foo'"),
    (["train", *R, "compact=int8"], "compact=int8: use float16 or bfloat16"),
    (["train", *R, "compact=fp16"], "compact=fp16: use float16 or bfloat16"),
    (["validate", "glue/rte_bitfit", *TINY, "compact=int8"], "compact=int8"),
    (["probe", *R, "probe.batches=100000"], "probe.batches=100000 but the training data gives 6 batches of 8"),
])
def test_bad_command_lines_are_one_line(glue_root, scratch, args, expected):
    refused(scratch, glue_root, args, expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_validate_refuses_a_device_this_machine_lacks(glue_root, scratch):
    refused(scratch, glue_root, ["validate", "glue/rte_bitfit", *TINY, "trainer.device=cuda"],
            "CUDA is not available here")


@pytest.mark.parametrize("score", ["nan", "1e999"])
@pytest.mark.parametrize("split", ["train", "dev"])
def test_stsb_scores_must_be_finite(glue_root, scratch, score, split):
    data = scratch.parent / "data"
    shutil.copytree(glue_root, data)
    path = data / "glue" / "STS-B" / f"{split}.tsv"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].rsplit("\t", 1)[0] + f"\t{score}"
    path.write_text("\n".join(lines) + "\n")
    refused(scratch, data, ["train", "recipe=glue/stsb_bitfit", *TINY, "trainer.max_steps=2"],
            f"STS-B/{split}.tsv:4: malformed row: score '{score}' is not a finite number")


def test_online_true_is_not_told_that_offline_mode_is_on(tmp_path, monkeypatch):
    """With online=true (HF_HUB_OFFLINE removed) a model the Hub does not give is not blamed on offline mode."""
    from selectune.backbone import ModelConfig, load_backbone

    for online in (False, True):
        if online:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        else:
            monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(SelectuneError) as refused_:
            load_backbone(ModelConfig(name_or_path=str(tmp_path / "nope")), 2, False, None, 0)
        said = str(refused_.value)
        assert ("online=true, but the Hub did not give it" in said) == online, said
        assert ("offline mode is on unless you pass online=true" in said) == (not online), said
