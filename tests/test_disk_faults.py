"""A full disk at each write a run makes: config, metrics, checkpoint, delta, export (and probe's maps).

Each failure is injected where the real one surfaces (an OSError from a write, safetensors' own
`SafetensorError`, torch.save's RuntimeError) and must give exactly one error line and exit 2, leaving either
the previous state byte-identical (nothing new in the watched scratch root) or a run that `trainer.resume=true`
finishes. Two more runs fill a real 2 MB tmpfs where this machine lets a test mount one.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from watch import R, tree

from conftest import TINY

LONG = ["recipe=glue/rte_bitfit", *TINY, "task.max_train_examples=64", "task.max_eval_examples=32",
        "trainer.max_steps=6", "trainer.eval_every=2", "trainer.checkpoint_every=2", "trainer.log_every=1"]
FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # what a full tmpfs gave


def enospc(path: object = None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if path is None else str(path))


@pytest.fixture
def scratch(data_env, tmp_path, monkeypatch) -> Path:
    """The watched root: the command's working folder and its temp folder (Hydra's staging)."""
    root = tmp_path / "root"
    (root / ".tmp").mkdir(parents=True)
    monkeypatch.chdir(root)
    monkeypatch.setattr(tempfile, "tempdir", str(root / ".tmp"))
    monkeypatch.setattr(sys, "argv", ["selectune"])
    return root


def selectune(capsys, *args: str) -> tuple[int, str]:
    """`selectune <args>` in this process: (exit code, the one error line it must end with)."""
    from selectune import cli

    capsys.readouterr()
    try:
        cli.main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    errors = [line for line in (out.out + out.err).splitlines() if line.startswith("selectune: error: ")]
    if code == 0:
        assert not errors, errors
        return code, ""
    assert len(errors) == 1 and out.err.rstrip().endswith(errors[0]), out.err[-3000:]
    return code, errors[0]


def stable(root: Path) -> dict[str, str]:
    """The scratch tree without torch's own compile cache in the temp folder (not selectune's to keep)."""
    return {k: v for k, v in tree(root).items() if not k.startswith(".tmp/torchinductor")}


def resume_finishes(capsys, run: Path) -> None:
    """The failed run is resumable: `trainer.resume=true` finishes it, with whole metrics records in order."""
    code, line = selectune(capsys, "train", *LONG, f"out_dir={run}", "trainer.resume=true")
    assert code == 0, line
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 6 and (run / "delta.safetensors").is_file() and not (run / "checkpoint").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # every line whole
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6], records


# --------------------------------------------------------------------------- each write
def test_config_write(scratch, capsys, monkeypatch):
    from selectune import runfs

    real = runfs.write_text

    def full_at_config(path, text, root):
        if path.name == "config.yaml" and path.parent.name != ".hydra.new":
            raise enospc(path)
        real(path, text, root)

    monkeypatch.setattr(runfs, "write_text", full_at_config)
    before = stable(scratch)
    code, line = selectune(capsys, "train", *LONG, "out_dir=run")
    assert code == 2 and "No space left on device" in line and "config.yaml" in line
    assert stable(scratch) == before  # the new run folder went with its .hydra/ and train.log


def test_metrics_write_leaves_a_partial_line_and_a_resumable_run(scratch, capsys, monkeypatch):
    """A full disk cuts the step-5 record half-way (after the step-4 checkpoint); resume drops the cut line."""
    from selectune.trainer import Trainer

    real = Trainer._write_jsonl

    def cut(self, record):
        if record.get("step") == 5:
            with (self.run_dir / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps(record)[:17])
            raise enospc(self.run_dir / "metrics.jsonl")
        real(self, record)

    monkeypatch.setattr(Trainer, "_write_jsonl", cut)
    code, line = selectune(capsys, "train", *LONG, "out_dir=run")
    assert code == 2 and "No space left on device" in line and "metrics.jsonl" in line
    run = scratch / "run"
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=True)["step"] == 4
    assert not (run / "metrics.jsonl").read_text().endswith("\n")  # the cut line a full disk leaves
    monkeypatch.setattr(Trainer, "_write_jsonl", real)
    resume_finishes(capsys, run)


@pytest.mark.parametrize("what", ["trainable.safetensors", "state.pt"])
def test_checkpoint_write_keeps_the_previous_checkpoint(scratch, capsys, monkeypatch, what):
    """The second checkpoint (step 4) fails: safetensors raises SafetensorError, torch.save a RuntimeError."""
    import safetensors.torch

    calls = {"n": 0}
    real_save_file, real_torch_save = safetensors.torch.save_file, torch.save

    def save_file(tensors, filename, metadata=None):
        if Path(filename).name == "trainable.safetensors" and what == "trainable.safetensors":
            calls["n"] += 1
            if calls["n"] == 2:
                Path(filename).write_bytes(b"\0" * 100)  # what a full disk leaves half-written
                raise SafetensorError(FULL)
        return real_save_file(tensors, filename, metadata=metadata)

    def save(obj, f, *args, **kwargs):
        if what == "state.pt" and Path(f).name == "state.pt":
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
                                   "writing file data/0: file write failed")
        return real_torch_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(torch, "save", save)
    code, line = selectune(capsys, "train", *LONG, "out_dir=run")
    assert code == 2
    assert ("No space left on device" if what == "trainable.safetensors" else "cannot write the checkpoint") in line
    run = scratch / "run"
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=True)["step"] == 2  # the previous one
    assert not (run / "checkpoint.tmp").exists() and not (run / "checkpoint.old").exists()
    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    monkeypatch.setattr(torch, "save", real_torch_save)
    resume_finishes(capsys, run)


def test_delta_write(scratch, capsys, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if Path(filename).name == "delta.safetensors.tmp":
            Path(filename).write_bytes(b"\0" * 100)
            raise SafetensorError(FULL)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    code, line = selectune(capsys, "train", *LONG, "out_dir=run")
    assert code == 2 and "No space left on device" in line and "delta.safetensors.tmp" in line
    run = scratch / "run"
    assert not list(run.glob("delta.safetensors*")) and not (run / "results.json").exists()
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    resume_finishes(capsys, run)


@pytest.mark.parametrize("form", ["merged", "peft"])
def test_export_write_leaves_no_folder_it_made(scratch, capsys, monkeypatch, form):
    """A full disk during either export form: one line, exit 2, and not even the parent folders it made."""
    if form == "peft":
        peft_model = pytest.importorskip("peft.peft_model")
        module, train_args = peft_model, ("recipe=glue/rte_lora", *TINY, "trainer.max_steps=2",
                                          "task.max_train_examples=16", "task.max_eval_examples=8")
    else:
        import transformers.modeling_utils

        module, train_args = transformers.modeling_utils, R
    code, line = selectune(capsys, "train", *train_args, "out_dir=run")
    assert code == 0, line

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError(FULL)

    monkeypatch.setattr(module, "safe_save_file", save_file)
    before = stable(scratch)
    out = f"exports/{form}/rte"
    code, line = selectune(capsys, "export", "run=run", f"out={out}", *(["format=peft"] if form == "peft" else []))
    assert code == 2 and line == f"selectune: error: cannot write out={out}: No space left on device"
    assert stable(scratch) == before and not (scratch / "exports").exists()


def test_probe_write(scratch, capsys, monkeypatch):
    import safetensors.torch

    def save_file(tensors, filename, metadata=None):
        raise SafetensorError(FULL)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    before = stable(scratch)
    code, line = selectune(capsys, "probe", *R, "probe.batches=2", "out_dir=p")
    assert code == 2 and "No space left on device" in line
    assert stable(scratch) == before


# --------------------------------------------------------------------------- a real full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs under tmp_path (root only); skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk(glue_root, small_disk, tmp_path):
    """Full fine-tuning of the tiny model stores 8 MB: the checkpoint cannot fit, and neither can an export."""
    from watch import cli, final_line, one_line

    args = ["train", "recipe=glue/rte_full", *TINY, "task.max_train_examples=64", "task.max_eval_examples=32",
            "trainer.max_steps=4", "trainer.eval_every=2"]
    line = final_line(cli(*args, "out_dir=run", cwd=small_disk, data=glue_root), "No space left on device")
    assert line == ("selectune: error: could not write the run in run: No space left on device "
                    "(run/checkpoint.tmp/trainable.safetensors)")
    assert sorted(p.name for p in small_disk.iterdir()) == [".tmp"]
    assert not list((small_disk / ".tmp").glob("selectune-stage-*"))
    work = tmp_path / "work"
    work.mkdir()
    done = cli(*args, "out_dir=run", cwd=work, data=glue_root)
    assert done.returncode == 0, done.stderr
    before = tree(small_disk)
    one_line(cli("export", f"run={work / 'run'}", f"out={small_disk / 'merged'}", cwd=work, data=glue_root),
             f"cannot write out={small_disk / 'merged'}: No space left on device")
    assert tree(small_disk) == before
