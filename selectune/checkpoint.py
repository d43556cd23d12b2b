"""Resumable training checkpoints, written atomically.

A checkpoint is a folder `checkpoint/` in the run directory with the trainable tensors
(safetensors), the optimiser and scheduler state, the RNG states and the loop position (torch.save,
read back with `weights_only=True`: tensors and plain containers only). It is written to
`checkpoint.tmp/` and renamed over the old one, so a run killed at any moment leaves either the
previous checkpoint or the new one, never half of one.

A checkpoint on disk may still be damaged (a copy cut short, a bad disk, a hand edit): reading it
checks what the loop will use (the state's keys, finite trainable tensors, the RNG states) and turns
any failure into one line, "checkpoint at <folder> is damaged: ...", instead of a traceback or a
resumed run that silently trains from garbage.
"""

from __future__ import annotations

import errno
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from selectune.errors import SelectuneError
from selectune.runfs import save_safetensors

NAME = "checkpoint"
# what the loop reads back from state.pt (besides "rng", added here), with the container each must be
STATE_KEYS: dict[str, type | tuple[type, ...]] = {
    "step": int, "optimizer": dict, "scheduler": dict, "scaler": dict, "method": dict, "evals": list,
    "best": (dict, type(None)), "delta_bytes": (int, type(None)), "train_time": (int, float)}


def save(run_dir: Path, params: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    final, tmp, old = run_dir / NAME, run_dir / f"{NAME}.tmp", run_dir / f"{NAME}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    try:  # a failed write (a full disk) leaves the previous checkpoint as it was, and no checkpoint.tmp/
        save_safetensors({n: p.detach().cpu().contiguous() for n, p in params.items()},
                         tmp / "trainable.safetensors")
        try:
            torch.save({**state, "rng": rng}, tmp / "state.pt")
        except RuntimeError as err:  # torch's writer reports a failed write as a RuntimeError
            raise OSError(errno.EIO, f"cannot write the checkpoint ({_why(err)})", str(tmp / "state.pt")) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def exists(run_dir: Path) -> bool:
    return (run_dir / NAME / "state.pt").is_file()


def damaged(run_dir: Path, problem: str) -> SelectuneError:
    return SelectuneError(f"checkpoint at {run_dir / NAME} is damaged: {problem}; remove that folder to start "
                          f"over, or choose another out_dir")


def _why(err: BaseException) -> str:
    """An exception from a reader as a short phrase: its type and the first sentence of its message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0].split('. ')[0][:160]}" if text else type(err).__name__


def read(run_dir: Path) -> dict[str, Any]:
    """The saved loop state (position, optimiser, scheduler, method state, RNG states)."""
    try:  # weights_only: tensors and plain containers, never code; any damage surfaces as some exception
        state = torch.load(run_dir / NAME / "state.pt", weights_only=True)
    except Exception as err:  # an untrusted file: every reader failure means the same
        raise damaged(run_dir, f"state.pt cannot be read ({_why(err)})") from None
    if not isinstance(state, dict):
        raise damaged(run_dir, f"state.pt holds a {type(state).__name__}, not the loop state")
    missing = [key for key in (*STATE_KEYS, "rng") if key not in state]
    if missing:
        raise damaged(run_dir, f"state.pt lacks {', '.join(missing)}")
    wrong = [key for key, kind in STATE_KEYS.items() if not isinstance(state[key], kind)]
    if wrong:
        raise damaged(run_dir, f"state.pt has a {type(state[wrong[0]]).__name__} as '{wrong[0]}'")
    if state["step"] < 0 or not {"state", "param_groups"} <= set(state["optimizer"]):
        raise damaged(run_dir, "state.pt has a negative step or an optimizer state without its groups")
    rng = state["rng"]
    if not (isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor) and rng["torch"].dtype == torch.uint8
            and isinstance(rng.get("python"), tuple)):
        raise damaged(run_dir, "state.pt has no valid RNG states")
    return state


def load_loop_states(run_dir: Path, state: dict[str, Any], **objects: Any) -> None:
    """`optimizer=`, `scheduler=`, `scaler=`: each loads its saved state from `state`. A saved state that does
    not fit this run (other parameter groups, a moment of another shape) is refused in one line here, not as a
    shape error inside the first step."""
    for key, obj in objects.items():
        try:
            obj.load_state_dict(state[key])
        except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as err:
            raise damaged(run_dir, f"state.pt's {key} state does not fit this run ({_why(err)})") from None
    optimizer = objects.get("optimizer")
    for group in optimizer.param_groups if optimizer is not None else []:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise damaged(run_dir, f"state.pt's optimizer {name} has shape {tuple(value.shape)} for a "
                                           f"parameter of shape {tuple(param.shape)}")


def restore(run_dir: Path, params: dict[str, torch.nn.Parameter], state: dict[str, Any]) -> None:
    """Copy the saved trainable tensors into `params` and restore the RNGs of `state`."""
    folder = run_dir / NAME
    try:
        saved = load_file(str(folder / "trainable.safetensors"))
    except Exception as err:  # an untrusted file: every reader failure means the same
        raise damaged(run_dir, f"trainable.safetensors cannot be read ({_why(err)})") from None
    bad = [name for name, tensor in saved.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise damaged(run_dir, f"trainable.safetensors: '{bad[0]}' holds NaN or infinite values")
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
    try:
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
    except (RuntimeError, TypeError, ValueError) as err:
        raise damaged(run_dir, f"state.pt has invalid RNG states ({_why(err)})") from None
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def remove(run_dir: Path) -> None:
    shutil.rmtree(run_dir / NAME, ignore_errors=True)
