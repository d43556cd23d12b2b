"""The TaskDelta: one safetensors file holding everything a run changed, and nothing else.

Keys are `<parameter name>::<kind>`:
    ::set                            the tensor's new value, whole (the task head, full FT, BitFit biases)
    ::lora_A ::lora_B ::lora_scale   W += scale · B A
    ::indices ::values               W.flat[indices] += values (sorted int32 flat indices, fp32 values)
    ::svd_P ::svd_E ::svd_Q ::svd_scale   W += scale · P diag(E) Q (AdaLoRA)
    ::ia3_scale ::ia3_axis           W's rows (axis 0) or columns (axis 1) times the vector (IA³)
    ::adapter_*                      an Adapter module (cannot be merged; attached by apply_to)
and the kinds of any other registered form (selectune.delta.forms: each form declares its kinds and
their dtypes, and checks, compacts, merges and undoes its own group; this file dispatches to them).
The compact form (`compact="float16"`) is each form's own: sparse entries as `::index_gaps` (first
index, then differences; uint16 where every gap fits, else int32) and half-precision `::values`, 4
bytes per stored number instead of 8. Loading turns it back into the plain form.
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
from selectune.errors import SelectuneError

FORMAT = "selectune.taskdelta/1"
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# The stored kinds, their dtypes, which of them count as stored numbers, how each form's group is checked,
# compacted and merged are the registered forms' own (selectune.delta.forms).
REQUIRED_META = {"config": dict, "base_hash": str, "method": str}  # what eval and export read


@dataclass
class TaskDelta:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------------------- structure
    def by_parameter(self) -> dict[str, dict[str, torch.Tensor]]:
        return _grouped(self.tensors, forms.kinds(), "task delta")

    def unmerged(self) -> dict[str, forms.Form]:
        """Weights whose group holds a form that cannot be merged into the weight (a module such as an
        Adapter, not a change of numbers), with that form; the form says so itself (`Form.merges`)."""
        out = {}
        for name, parts in self.by_parameter().items():
            for form in forms.forms_of(name, parts):
                if not form.merges:
                    out[name] = form
        return dict(sorted(out.items()))

    @property
    def adapters(self) -> list[str]:
        """Weights whose entries cannot be merged (`unmerged`), by name."""
        return list(self.unmerged())

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
        """Merge what merges into the weights and attach what does not (Adapters) as modules (for evaluation)."""
        self.merge_into(model, allow_unmerged=True)
        by_name = self.by_parameter()
        for name, form in self.unmerged().items():
            form.apply(model, name, by_name[name])

    @torch.no_grad()
    def merge_into(self, model: nn.Module, allow_unmerged: bool = False) -> None:
        """Write the delta into a plain base model's weights, in fp32 (then cast as the caller wants).
        A form that cannot merge is refused, whatever its name; with `allow_unmerged` it is left out
        (apply_to attaches it, export writes it beside the model where the form ships that way)."""
        params = dict(model.named_parameters())
        self.check_fits(model)
        unmerged = self.unmerged()
        if unmerged and not allow_unmerged:
            raise SelectuneError(f"task delta: {_describe(unmerged)} cannot be merged into weights")
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
            tensors = {k: v.detach().to("cpu").contiguous()
                       for k, v in _compact(self.by_parameter(), HALF[compact]).items()}
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
        plain: dict[str, torch.Tensor] = {}
        for name, parts in _grouped(tensors, forms.file_kinds(), where).items():
            for form in forms.registered().values():
                own = {k: v for k, v in parts.items() if k in form.kinds or k in form.compact_kinds}
                if own:
                    form.check_dtypes(name, own, where)
                    plain.update({f"{name}::{k}": v for k, v in form.expand(name, own, where).items()})
        delta = cls(plain, meta)
        delta.check(where)
        return delta

    def check(self, where: str = "task delta") -> None:
        """Every parameter's entries are complete and consistent: the kinds of its forms come together,
        in their dtypes, with the right dimensions, matching lengths and factor shapes, finite values and
        sorted unique non-negative int32 indices (each form's `check_alone`)."""
        for name, parts in _grouped(self.tensors, forms.kinds(), where).items():
            _check_parameter(name, parts, where)

    def check_fits(self, model: nn.Module, where: str = "task delta", resize_head: bool = False) -> None:
        """The one fit check (merge, export, eval and the in-place apply): every entry fits `model`
        (names, shapes, indices below the tensor's size), checked for all parameters before any weight
        is written, so a refused delta leaves the model untouched. `resize_head`: a head of another
        label count may replace the model's (the in-place apply)."""
        self.check(where)
        params = dict(model.named_parameters())
        for name, parts in self.by_parameter().items():
            if name not in params:
                raise SelectuneError(f"{where}: '{name}' is changed by the delta, but this model does not have it "
                                     f"(trained on base '{self.meta.get('base_model')}')")
            for form in forms.forms_of(name, parts):
                form.check_fit(name, parts, params[name], model, where, resize_head)


def _describe(unmerged: dict[str, forms.Form]) -> str:
    """`2 weights hold Adapter entries` for a refusal line."""
    names = sorted({type(form).__name__ for form in unmerged.values()})
    return f"{len(unmerged)} weights hold {', '.join(names)} entries (a form that is not merged into a weight)"


def _check_meta(meta: Any, where: str) -> None:
    if not isinstance(meta, dict):
        raise SelectuneError(f"{where}: its metadata is a JSON {type(meta).__name__}, not an object")
    for key, kind in REQUIRED_META.items():
        if not isinstance(meta.get(key), kind):
            found = "missing" if key not in meta else f"a {type(meta[key]).__name__}"
            raise SelectuneError(f"{where}: metadata '{key}' is {found} (a {kind.__name__} is required)")


def _grouped(tensors: dict[str, torch.Tensor], known: tuple[str, ...], where: str) -> dict[str, forms.Parts]:
    """`<name>::<kind>` entries per parameter name; a kind no registered form stores is refused."""
    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        name, sep, kind = key.rpartition("::")
        if not sep or kind not in known:
            raise SelectuneError(f"{where}: unknown entry '{key}' (kinds: {', '.join(forms.kinds())})")
        grouped[name][kind] = tensor
    return dict(grouped)


def _check_parameter(name: str, parts: dict[str, torch.Tensor], where: str) -> None:
    """One parameter's entries, on their own (without the model): see `TaskDelta.check`."""
    for form in forms.registered().values():
        present = [kind for kind in form.dims if kind in parts]
        if not present:
            continue
        missing = [kind for kind in form.dims if kind not in parts]
        if missing:
            raise SelectuneError(f"{where}: '{name}::{present[0]}' comes without '::{missing[0]}'")
        own = {kind: parts[kind] for kind in form.dims}
        form.check_dtypes(name, own, where)
        for kind, dims in form.dims.items():
            tensor = parts[kind]
            if dims is not None and tensor.dim() != dims:
                raise SelectuneError(f"{where}: '{name}::{kind}' has shape {tuple(tensor.shape)} "
                                     f"({tensor.dim()} dimensions, expected {dims})")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise SelectuneError(f"{where}: '{name}::{kind}' holds {bad} NaN or infinite values")
        form.check_alone(name, own, where)
        product = getattr(form, "delta_weight", None)  # factors that are finite may still overflow when multiplied
        if product is not None:
            bad = int((~torch.isfinite(product(own))).sum())
            if bad:
                raise SelectuneError(f"{where}: '{name}::{present[0]}' and its factors multiply to {bad} NaN or "
                                     f"infinite values")


def _compact(groups: dict[str, dict[str, torch.Tensor]], half: torch.dtype) -> dict[str, torch.Tensor]:
    """Each form's compact file form of its group (`Form.compact`: sparse entries as first index then gaps,
    half-precision values; the other forms as they are)."""
    out = {}
    for name, parts in groups.items():
        for form in forms.forms_of(name, parts):
            own = {kind: parts[kind] for kind in form.kinds}
            out.update({f"{name}::{kind}": t for kind, t in form.compact(own, half).items()})
    return out
