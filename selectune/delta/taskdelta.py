"""The TaskDelta: one safetensors file holding everything a run changed, and nothing else.

Keys are `<parameter name>::<kind>`:
    ::set                            the tensor's new value, whole (the task head, full FT, BitFit biases)
    ::lora_A ::lora_B ::lora_scale   W += scale · B A
    ::indices ::values               W.flat[indices] += values (sorted int32 flat indices, fp32 values)
    ::svd_P ::svd_E ::svd_Q ::svd_scale   W += scale · P diag(E) Q (AdaLoRA)
    ::adapter_*                      an Adapter module (cannot be merged; attached by apply_to)
The compact form (`compact=True`) stores sparse entries as `::index_gaps` (first index, then
differences; uint16 where every gap fits, else int32) and half-precision `::values`: 4 bytes per
stored number instead of 8. Loading turns it back into the plain form.
The JSON metadata (safetensors' string header) names the base model and a hash of the base weights it
was trained on, the method, the budget line and the resolved config. Loading reads tensors and JSON
only: no pickle, no code.
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

from selectune.delta.adapter import KINDS as ADAPTER_KINDS
from selectune.delta.adapter import AdapterLinear
from selectune.delta.forms import check_shape as _check_shape  # noqa: F401 (kept importable)
from selectune.delta.forms import forms_of
from selectune.delta.wrapping import replace_module
from selectune.errors import SelectuneError

FORMAT = "selectune.taskdelta/1"
KINDS = ("set", "lora_A", "lora_B", "lora_scale", "indices", "values", "svd_P", "svd_E", "svd_Q", "svd_scale",
         *ADAPTER_KINDS)
# kinds whose numbers count as stored
VALUE_KINDS = ("set", "lora_A", "lora_B", "values", "svd_P", "svd_E", "svd_Q", *ADAPTER_KINDS)
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TaskDelta:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------------------- structure
    def by_parameter(self) -> dict[str, dict[str, torch.Tensor]]:
        grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        for key, tensor in self.tensors.items():
            name, sep, kind = key.rpartition("::")
            if not sep or kind not in KINDS:
                raise SelectuneError(f"task delta: unknown entry '{key}' (kinds: {', '.join(KINDS)})")
            grouped[name][kind] = tensor
        return dict(grouped)

    @property
    def adapters(self) -> list[str]:
        """Weights with an Adapter: a module, not a change of numbers, so it cannot be merged."""
        return sorted(n for n, parts in self.by_parameter().items() if "adapter_up_weight" in parts)

    @property
    def stored(self) -> int:
        return sum(t.numel() for k, t in self.tensors.items() if k.rpartition("::")[2] in VALUE_KINDS)

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
        for name, parts in self.by_parameter().items():
            if name not in params:
                raise SelectuneError(f"task delta changes '{name}', which this model does not have "
                                     f"(trained on base '{self.meta.get('base_model')}')")
            for form in forms_of(name, parts):
                if form.merges:
                    form.check(name, parts, params[name])
                    form.merge(params[name], parts)

    # ----------------------------------------------------------------------------- file
    def save(self, path: str | Path, compact: str | None = None) -> int:
        """Write atomically (a temporary file renamed into place); returns the size in bytes.

        `compact="float16"` or `"bfloat16"` writes sparse entries delta-encoded with half values."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        if compact is not None:
            tensors = _compact(tensors, HALF[compact])
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "selectune": json.dumps(self.meta)})
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
            raise SelectuneError(f"{path}: not a readable task delta (truncated or corrupted: {err})") from None
        if header.get("format") != FORMAT:
            raise SelectuneError(f"{path}: not a selectune task delta (format '{header.get('format')}')")
        try:
            meta = json.loads(header["selectune"])
        except (KeyError, json.JSONDecodeError):
            raise SelectuneError(f"{path}: task delta metadata is missing or corrupted") from None
        delta = cls(_expand(tensors), meta)
        delta.by_parameter()  # validates the key layout
        return delta


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


def _expand(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The compact form back to the plain one (int32 indices, fp32 values)."""
    out = {}
    for key, tensor in tensors.items():
        name, _, kind = key.rpartition("::")
        if kind == "index_gaps":
            out[f"{name}::indices"] = torch.cumsum(tensor.to(torch.int64), 0).to(torch.int32)
        elif kind == "values":
            out[key] = tensor.float()
        else:
            out[key] = tensor
    return out
