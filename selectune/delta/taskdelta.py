"""The TaskDelta: one safetensors file holding everything a run changed, and nothing else.

Keys are `<parameter name>::<kind>`:
    ::set                            the tensor's new value, whole (the task head, full FT, BitFit biases)
    ::lora_A ::lora_B ::lora_scale   W += scale · B A
    ::indices ::values               W.flat[indices] += values (sorted int32 flat indices, fp32 values)
    ::svd_P ::svd_E ::svd_Q ::svd_scale   W += scale · P diag(E) Q (AdaLoRA)
    ::adapter_*                      an Adapter module (cannot be merged; attached by apply_to)
and the kinds of any form a method module registers (selectune.delta.forms: each form checks, merges
and undoes its own group).
The compact form (`compact=True`) stores sparse entries as `::index_gaps` (first index, then
differences; uint16 where every gap fits, else int32) and half-precision `::values`: 4 bytes per
stored number instead of 8. Loading turns it back into the plain form.
The JSON metadata (safetensors' string header) names the base model and a hash of the base weights it
was trained on, the method, the budget line and the resolved config. Loading reads tensors and JSON
only: no pickle, no code.

A delta file is never trusted: loading checks every tensor (dtype, rank, matching lengths and factor
shapes, finite numbers, sorted unique non-negative indices) and the metadata, and applying checks that
every entry fits the model (names, shapes, indices below the tensor's size) before any weight changes.
Each check is one pass of vectorised torch ops per tensor, so a delta of millions of entries loads in
milliseconds, and a damaged or hostile file fails with one line naming the tensor and the problem
instead of wrapping a negative index around or writing NaN into the model.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selectune.delta import forms
from selectune.delta.adapter import AdapterLinear
from selectune.delta.wrapping import replace_module
from selectune.errors import SelectuneError

FORMAT = "selectune.taskdelta/1"
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# The stored kinds, which of them count as stored numbers, and how each form's group is checked are the
# registered forms' own (selectune.delta.forms: `kinds()`, `value_kinds()`, `Form.check_alone/check_fit`).
INDEX_DTYPES = (torch.int32, torch.int64)  # ::indices (int32 as written; int64 accepted)
GAP_DTYPES = (torch.uint16, torch.int32, torch.int64)  # ::index_gaps of the compact form
REQUIRED_META = {"config": dict, "base_hash": str, "method": str}  # what eval and export read


@dataclass
class TaskDelta:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------------------- structure
    def by_parameter(self) -> dict[str, dict[str, torch.Tensor]]:
        grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        known = forms.kinds()
        for key, tensor in self.tensors.items():
            name, sep, kind = key.rpartition("::")
            if not sep or kind not in known:
                raise SelectuneError(f"task delta: unknown entry '{key}' (kinds: {', '.join(known)})")
            grouped[name][kind] = tensor
        return dict(grouped)

    @property
    def adapters(self) -> list[str]:
        """Weights with an Adapter: a module, not a change of numbers, so it cannot be merged."""
        return sorted(n for n, parts in self.by_parameter().items() if "adapter_up_weight" in parts)

    @property
    def stored(self) -> int:
        counted = forms.value_kinds()
        return sum(t.numel() for k, t in self.tensors.items() if k.rpartition("::")[2] in counted)

    def sparse_indices(self) -> dict[str, torch.Tensor]:
        """The mask of the sparse entries: flat indices per weight (only weights with ::indices)."""
        return {name: parts["indices"] for name, parts in self.by_parameter().items() if "indices" in parts}

    # ----------------------------------------------------------------------------- apply
    @torch.no_grad()
    def apply_to(self, model: nn.Module) -> None:
        """Merge what merges into the weights and attach the Adapters as modules (for evaluation)."""
        adapters = self.adapters
        self.merge_into(model, allow_adapters=True)
        by_name = self.by_parameter()
        for name in adapters:
            module_name = name.rpartition(".")[0]
            replace_module(model, module_name, AdapterLinear.from_entries(model.get_submodule(module_name),
                                                                            by_name[name]))

    @torch.no_grad()
    def merge_into(self, model: nn.Module, allow_adapters: bool = False) -> None:
        """Write the delta into a plain base model's weights, in fp32 (then cast as the caller wants).
        Adapters cannot be merged: with `allow_adapters` they are left out (apply_to attaches them)."""
        params = dict(model.named_parameters())
        if self.adapters and not allow_adapters:
            raise SelectuneError(f"the delta holds Adapter modules on {len(self.adapters)} weights, which cannot "
                                 f"be merged into weights; they are exported as modules (adapters.safetensors)")
        self.check_fits(model)
        for name, parts in self.by_parameter().items():
            for form in forms.forms_of(name, parts):
                if form.merges:
                    form.merge(params[name], parts)

    # ----------------------------------------------------------------------------- file
    def save(self, path: str | Path, compact: str | None = None) -> int:
        """Write atomically (a temporary file renamed into place); returns the size in bytes.

        `compact="float16"` or `"bfloat16"` writes sparse entries delta-encoded with half values."""
        from selectune.runfs import save_safetensors

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        if compact is not None:
            tensors = _compact(tensors, HALF[compact])
        save_safetensors(tensors, tmp, {"format": FORMAT, "selectune": json.dumps(self.meta)})  # OSError when full
        os.replace(tmp, path)
        return path.stat().st_size

    @classmethod
    def load(cls, path: str | Path) -> TaskDelta:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if path.is_dir():
            path = path / "delta.safetensors"
        if not path.is_file():
            raise SelectuneError(f"no task delta at {path} (give a run directory or a .safetensors delta file)")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            why = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise SelectuneError(f"delta {path} is damaged: not readable, truncated or corrupted ({why})") from None
        if header.get("format") != FORMAT:
            raise SelectuneError(f"{path}: not a selectune task delta (format '{header.get('format')}')")
        try:
            meta = json.loads(header["selectune"])
        except (KeyError, json.JSONDecodeError):
            raise SelectuneError(f"delta {path} is damaged: task delta metadata is missing or corrupted") from None
        return cls.checked(tensors, meta, f"delta {path} is damaged")

    @classmethod
    def checked(cls, tensors: dict[str, torch.Tensor], meta: Any, where: str = "task delta") -> TaskDelta:
        """A TaskDelta from untrusted stored tensors (plain or compact form) and metadata: every tensor
        and the metadata are checked first; a problem raises one line starting with `where`."""
        _check_meta(meta, where)
        _check_dtypes(tensors, where)
        delta = cls(_expand(tensors, where), meta)
        delta.check(where)
        for key, tensor in delta.tensors.items():
            if key.endswith("::indices"):
                delta.tensors[key] = tensor.to(torch.int32)
        return delta

    def check(self, where: str = "task delta") -> None:
        """Every parameter's entries are complete and consistent: the kinds of its forms come together,
        with the right ranks, matching lengths and factor shapes, finite values and sorted unique
        non-negative int32 indices."""
        _check_dtypes(self.tensors, where)
        for name, parts in self.by_parameter().items():
            _check_parameter(name, parts, where)

    def check_fits(self, model: nn.Module, where: str = "task delta") -> None:
        """Every entry fits `model` (names, shapes, indices below the tensor's size), checked for all
        parameters before any weight is written, so a refused delta leaves the model untouched."""
        self.check(where)
        params = dict(model.named_parameters())
        for name, parts in self.by_parameter().items():
            if name not in params:
                raise SelectuneError(f"{where}: '{name}' is changed by the delta, but this model does not have it "
                                     f"(trained on base '{self.meta.get('base_model')}')")
            for form in forms.forms_of(name, parts):
                form.check_fit(name, parts, params[name], model, where)


def _check_meta(meta: Any, where: str) -> None:
    if not isinstance(meta, dict):
        raise SelectuneError(f"{where}: its metadata is a JSON {type(meta).__name__}, not an object")
    for key, kind in REQUIRED_META.items():
        if not isinstance(meta.get(key), kind):
            found = "missing" if key not in meta else f"a {type(meta[key]).__name__}"
            raise SelectuneError(f"{where}: metadata '{key}' is {found} (a {kind.__name__} is required)")


def _check_dtypes(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Known kinds only; indices are integers and everything else floats (checked before `_expand`
    converts anything, so integer `values` are refused rather than silently cast)."""
    known = forms.kinds()
    for key, tensor in tensors.items():
        kind = key.rpartition("::")[2]
        if kind not in (*known, "index_gaps"):
            raise SelectuneError(f"{where}: unknown entry '{key}' (kinds: {', '.join(known)})")
        allowed = {"indices": INDEX_DTYPES, "index_gaps": GAP_DTYPES}.get(kind)
        if allowed is None and not tensor.is_floating_point():
            raise SelectuneError(f"{where}: '{key}' has dtype {tensor.dtype}, not a floating-point type")
        if allowed is not None and tensor.dtype not in allowed:
            raise SelectuneError(f"{where}: '{key}' has dtype {tensor.dtype} (expected "
                                 f"{' or '.join(str(d) for d in allowed)})")
        if kind == "index_gaps" and f"{key.rpartition('::')[0]}::indices" in tensors:
            raise SelectuneError(f"{where}: '{key}' and '::indices' both given for one tensor")


def _check_parameter(name: str, parts: dict[str, torch.Tensor], where: str) -> None:
    """One parameter's entries, on their own (without the model): see `TaskDelta.check`."""
    for form in forms.registered().values():
        present = [kind for kind in form.ranks if kind in parts]
        if not present:
            continue
        missing = [kind for kind in form.ranks if kind not in parts]
        if missing:
            raise SelectuneError(f"{where}: '{name}::{present[0]}' comes without '::{missing[0]}'")
        for kind, rank in form.ranks.items():
            tensor = parts[kind]
            if rank is not None and tensor.dim() != rank:
                raise SelectuneError(f"{where}: '{name}::{kind}' has shape {tuple(tensor.shape)} "
                                     f"({tensor.dim()} dimensions, expected {rank})")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise SelectuneError(f"{where}: '{name}::{kind}' holds {bad} NaN or infinite values")
        form.check_alone(name, parts, where)
        product = getattr(form, "delta_weight", None)  # factors that are finite may still overflow when multiplied
        if product is not None:
            bad = int((~torch.isfinite(product(parts))).sum())
            if bad:
                raise SelectuneError(f"{where}: '{name}::{present[0]}' and its factors multiply to {bad} NaN or "
                                     f"infinite values")


def _compact(tensors: dict[str, torch.Tensor], half: torch.dtype) -> dict[str, torch.Tensor]:
    """Sparse entries as first-index-then-gaps (uint16 when every gap fits) and half-precision values."""
    out = {}
    for key, tensor in tensors.items():
        name, _, kind = key.rpartition("::")
        if kind == "indices":
            gaps = torch.diff(tensor.long(), prepend=torch.zeros(1, dtype=torch.long))
            small = gaps.numel() == 0 or int(gaps.max()) < 2**16
            out[f"{name}::index_gaps"] = gaps.to(torch.uint16 if small else torch.int32)
        elif kind == "values":
            out[key] = tensor.to(half)
        else:
            out[key] = tensor
    return out


def _expand(tensors: dict[str, torch.Tensor], where: str = "task delta") -> dict[str, torch.Tensor]:
    """The compact form back to the plain one (fp32 values; gaps summed to int64 indices, which
    `TaskDelta.checked` range-checks before casting them to int32, so no sum can wrap around)."""
    out = {}
    for key, tensor in tensors.items():
        name, _, kind = key.rpartition("::")
        if kind == "index_gaps":
            if tensor.dim() != 1:
                raise SelectuneError(f"{where}: '{key}' has shape {tuple(tensor.shape)} (expected 1 dimension)")
            out[f"{name}::indices"] = torch.cumsum(tensor.to(torch.int64), 0)
        elif kind == "values":
            out[key] = tensor.float()
        else:
            out[key] = tensor
    return out
