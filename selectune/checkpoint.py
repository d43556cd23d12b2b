"""Resumable training checkpoints, written atomically.

A checkpoint is a folder `checkpoint/` in the run directory with the trainable tensors
(safetensors), the optimiser and scheduler state, the RNG states and the loop position (torch.save,
read back with `weights_only=True`: tensors and plain containers only). It is written to
`checkpoint.tmp/` and renamed over the old one, so a run killed at any moment leaves either the
previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from selectune.errors import SelectuneError

NAME = "checkpoint"


def save(run_dir: Path, params: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    final, tmp, old = run_dir / NAME, run_dir / f"{NAME}.tmp", run_dir / f"{NAME}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, str(tmp / "trainable.safetensors"))
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({**state, "rng": rng}, tmp / "state.pt")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def exists(run_dir: Path) -> bool:
    return (run_dir / NAME / "state.pt").is_file()


def read(run_dir: Path) -> dict[str, Any]:
    """The saved loop state (position, optimiser, scheduler, method state, RNG states)."""
    return torch.load(run_dir / NAME / "state.pt", weights_only=True)


def restore(run_dir: Path, params: dict[str, torch.nn.Parameter], state: dict[str, Any]) -> None:
    """Copy the saved trainable tensors into `params` and restore the RNGs of `state`."""
    folder = run_dir / NAME
    saved = load_file(str(folder / "trainable.safetensors"))
    if set(saved) != set(params):
        raise SelectuneError(f"checkpoint in {folder} was written by another method or model "
                             f"({len(saved)} trainable tensors saved, {len(params)} now); start a new run dir")
    with torch.no_grad():
        for name, param in params.items():
            if saved[name].shape != param.shape:
                raise SelectuneError(f"checkpoint in {folder}: '{name}' has shape {tuple(saved[name].shape)}, "
                                     f"the run now {tuple(param.shape)}; start a new run dir")
            param.copy_(saved[name])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def remove(run_dir: Path) -> None:
    shutil.rmtree(run_dir / NAME, ignore_errors=True)
