"""Delta forms as stored: each form owns everything about the TaskDelta entries it writes.

A TaskDelta groups its entries per parameter (`<name>::<kind>`); which form a group holds is told by
one marker kind (`set`, `indices`, `svd_P`, `lora_A`, `adapter_up_weight`, `ia3_scale`). Every form here
    declares   `dims` (the kinds it stores, with their number of dimensions), `dtypes` (the integer
               kinds and the integer dtypes they may have; every other kind is floating point),
               `value_kinds` (which count as stored numbers) and `merges` (whether it can be written
               into the weight; `ships_beside`: if not, whether export writes it beside the model),
    checks     a group read from a file on its own (`check_alone`) and against the model's parameter
               (`check_fit`: THE fit check, used by merge, export, eval and the in-place apply alike),
    compacts   its group for a smaller file (`compact`) and reads the compact group back (`expand`),
    merges     the group into the parameter in place, in fp32 (export and `TaskDelta.merge_into`),
    applies    the same merge and returns an `Undo` holding exactly what restores the base bit for bit:
               the base values at the touched indices (sparse), the replaced tensor (dense, low-rank,
               SVD, row/column scale) or the replaced module (Adapters, which cannot merge and are
               attached instead).
Undoing never subtracts: W0 + Δ − Δ is not W0 in floating point, a copy of W0's touched part is.
`TaskDelta` and the in-place API (`selectune.api`) dispatch through `FORMS` (peft's
`get_delta_weight`/`merge`/`unmerge` split). The forms are generic (a row or column scale serves IA³
and any method that scales a Linear's outputs or inputs): a new stored form is one subclass registered
here, so reading a delta never imports a method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from selectune.backbone import HEAD_PREFIXES
from selectune.delta.adapter import KINDS as ADAPTER_KINDS
from selectune.delta.adapter import AdapterLinear
from selectune.delta.wrapping import replace_module
from selectune.errors import SelectuneError

Parts = dict[str, torch.Tensor]
MAX_INDEX = 2**31 - 1  # sparse indices are stored as int32
INDEX_DTYPES = (torch.int32, torch.int64)  # ::indices (int32 as written; int64 accepted)
GAP_DTYPES = (torch.uint16, torch.int32, torch.int64)  # ::index_gaps of the compact form


@dataclass
class Undo:
    """What one applied group needs to be taken back; `restore()` puts the base back exactly."""

    name: str
    restore: Callable[[], None]
    held: int  # bytes kept to undo (what an active delta costs beyond its own tensors)


class Form:
    """One stored delta form. Subclasses set the class attributes and `merge` (and `apply` when a plain
    copy of the parameter is not the cheapest exact undo); `check_alone` and `check_fit` are what a
    delta must pass before anything is written (`TaskDelta.checked`, `TaskDelta.check_fits`)."""

    marker: ClassVar[str]  # the kind whose presence says a group holds this form
    dims: ClassVar[dict[str, int | None]]  # every kind it stores, with its number of dimensions (None: any)
    value_kinds: ClassVar[tuple[str, ...]]  # the kinds whose numbers count as stored
    # Integer kinds and the dtypes a file may hold them in; every other kind must be floating point.
    dtypes: ClassVar[dict[str, tuple[torch.dtype, ...]]] = {}
    compact_kinds: ClassVar[tuple[str, ...]] = ()  # kinds only the compact file form holds (`expand` reads them)
    merges: ClassVar[bool] = True  # False: a module, attached rather than written into the weight
    ships_beside: ClassVar[bool] = False  # not merging: export writes it beside the model (else refuses)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.dims)

    def holds(self, parts: Parts) -> bool:
        """Whether a group (plain or compact) holds this form."""
        return self.marker in parts

    def check_dtypes(self, name: str, parts: Parts, where: str) -> None:
        """Each kind in its own dtypes, checked before `expand` converts anything (so integer values are
        refused rather than silently cast)."""
        for kind, tensor in parts.items():
            allowed = self.dtypes.get(kind)
            if allowed is None and not tensor.is_floating_point():
                raise SelectuneError(f"{where}: '{name}::{kind}' has dtype {tensor.dtype}, not a floating-point type")
            if allowed is not None and tensor.dtype not in allowed:
                raise SelectuneError(f"{where}: '{name}::{kind}' has dtype {tensor.dtype} (expected "
                                     f"{' or '.join(str(d) for d in allowed)})")

    def compact(self, parts: Parts, half: torch.dtype) -> Parts:
        """The group as the compact file form stores it (`TaskDelta.save(compact=...)`); default: as it is."""
        return parts

    def expand(self, name: str, parts: Parts, where: str) -> Parts:
        """A group read from a file (plain or compact) in the plain form and its written dtypes."""
        return parts

    def check_alone(self, name: str, parts: Parts, where: str) -> None:
        """The lengths and inner dimensions that must agree within the group (no model needed); the
        kinds are all present with their dimensions and finite values by then."""

    def fit_shape(self, parts: Parts) -> tuple[str, tuple[int, ...]] | None:
        """(what, shape) of the weight this group changes, to compare with the model's tensor."""
        return None

    def check_fit(self, name: str, parts: Parts, param: torch.Tensor, model: nn.Module, where: str,
                  resize_head: bool = False) -> None:
        """The group against the model's tensor: the one check before merge, export, eval and apply.
        `resize_head`: a head of another shape may replace the model's (in-place apply, not merge)."""
        fit = self.fit_shape(parts)
        if fit is not None and tuple(fit[1]) != tuple(param.shape):
            raise SelectuneError(f"{where}: '{name}' ({fit[0]}) has shape {tuple(fit[1])} but the model's is "
                                 f"{tuple(param.shape)} (a delta for another base model?)")

    def merge(self, param: torch.Tensor, parts: Parts) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def apply(self, model: nn.Module, name: str, parts: Parts) -> Undo:
        """Merge in place, keeping a copy of the parameter to restore."""
        param = model.get_parameter(name)
        saved = param.detach().clone()
        self.merge(param, parts)
        return Undo(name, lambda: param.data.copy_(saved), _nbytes(saved))


class DenseSet(Form):
    """`::set`: the tensor's new value, whole (the head, full fine-tuning, BitFit biases, LN-tuning). A head
    of another label count replaces the classifier's Parameter (shape and all); the old one is kept."""

    marker, dims, value_kinds = "set", {"set": None}, ("set",)

    def fit_shape(self, parts: Parts) -> tuple[str, tuple[int, ...]] | None:
        return "set", tuple(parts["set"].shape)

    def check_fit(self, name: str, parts: Parts, param: torch.Tensor, model: nn.Module, where: str,
                  resize_head: bool = False) -> None:
        if not (resize_head and name.startswith(HEAD_PREFIXES)):
            super().check_fit(name, parts, param, model, where)

    def merge(self, param: torch.Tensor, parts: Parts) -> None:
        param.copy_(parts["set"].to(param.device, param.dtype))

    @torch.no_grad()
    def apply(self, model: nn.Module, name: str, parts: Parts) -> Undo:
        param = model.get_parameter(name)
        if tuple(parts["set"].shape) == tuple(param.shape):
            return super().apply(model, name, parts)
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        new = nn.Parameter(parts["set"].to(param.device, param.dtype).clone(), requires_grad=param.requires_grad)
        setattr(module, attr, new)
        _resize_linear(module)

        def restore() -> None:
            setattr(module, attr, param)
            _resize_linear(module)

        return Undo(name, restore, 0)  # the old Parameter is kept as it was, not copied


class SparseEntries(Form):
    """`::indices` + `::values`: W.flat[indices] += values (sorted int32 flat indices, fp32 values).
    Undo keeps the base values at those indices only. Compact file form: `::index_gaps` (first index, then
    differences; uint16 where every gap fits, else int32) and half-precision `::values`, 4 bytes per stored
    number instead of 8."""

    marker, dims, value_kinds = "indices", {"indices": 1, "values": 1}, ("values",)
    dtypes = {"indices": INDEX_DTYPES, "index_gaps": GAP_DTYPES}
    compact_kinds = ("index_gaps",)

    def holds(self, parts: Parts) -> bool:
        return "indices" in parts or "index_gaps" in parts

    def compact(self, parts: Parts, half: torch.dtype) -> Parts:
        gaps = torch.diff(parts["indices"].long(), prepend=torch.zeros(1, dtype=torch.long))
        small = gaps.numel() == 0 or int(gaps.max()) < 2**16
        return {"index_gaps": gaps.to(torch.uint16 if small else torch.int32), "values": parts["values"].to(half)}

    def expand(self, name: str, parts: Parts, where: str) -> Parts:
        """Gaps summed in int64 and indices range-checked before the cast to int32 (no sum or cast can wrap
        around); values in fp32."""
        out = dict(parts)
        if "index_gaps" in out:
            if "indices" in out:
                raise SelectuneError(f"{where}: '{name}::index_gaps' and '::indices' both given for one tensor")
            gaps = out.pop("index_gaps")
            if gaps.dim() != 1:
                raise SelectuneError(f"{where}: '{name}::index_gaps' has shape {tuple(gaps.shape)} "
                                     f"(expected 1 dimension)")
            out["indices"] = torch.cumsum(gaps.to(torch.int64), 0)
        idx = out.get("indices")
        if idx is not None and idx.numel() and idx.dim() == 1:
            _check_index_range(name, idx, where)
            out["indices"] = idx.to(torch.int32)
        if "values" in out:
            out["values"] = out["values"].float()
        return out

    def check_alone(self, name: str, parts: Parts, where: str) -> None:
        idx = parts["indices"]
        if idx.numel() != parts["values"].numel():
            raise SelectuneError(f"{where}: '{name}::indices' {tuple(idx.shape)} does not match '::values' "
                                 f"{tuple(parts['values'].shape)} ({idx.numel():,} indices but "
                                 f"{parts['values'].numel():,} values)")
        if idx.numel():
            _check_index_range(name, idx, where)
            steps = idx[1:] > idx[:-1]
            if not bool(steps.all()):
                at = int((~steps).nonzero()[0])
                problem = "duplicated" if int(idx[at]) == int(idx[at + 1]) else "not sorted"
                raise SelectuneError(f"{where}: '{name}::indices' are {problem} (position {at + 1}: "
                                     f"{int(idx[at])} then {int(idx[at + 1])})")

    def check_fit(self, name: str, parts: Parts, param: torch.Tensor, model: nn.Module, where: str,
                  resize_head: bool = False) -> None:
        if parts["indices"].numel() and int(parts["indices"].max()) >= param.numel():
            raise SelectuneError(f"{where}: '{name}::indices' holds index {int(parts['indices'].max())}, but the "
                                 f"model's tensor has {param.numel()} entries (indices outside it: a delta for "
                                 f"another base model?)")

    def merge(self, param: torch.Tensor, parts: Parts) -> None:
        flat = param.data.view(-1)
        idx = parts["indices"].long().to(param.device)
        flat[idx] = (flat[idx].float() + parts["values"].float().to(param.device)).to(param.dtype)

    @torch.no_grad()
    def apply(self, model: nn.Module, name: str, parts: Parts) -> Undo:
        param = model.get_parameter(name)
        idx = parts["indices"].long().to(param.device)
        saved = param.data.view(-1)[idx].clone()
        self.merge(param, parts)

        def restore() -> None:  # the indices are the delta's own: only the base values are held
            param.data.view(-1)[parts["indices"].long().to(param.device)] = saved.to(param.device)

        return Undo(name, restore, _nbytes(saved))


class _Factored(Form):
    """A dense ΔW made of factors: W += ΔW, in fp32, then cast back to the weight's dtype."""

    product: ClassVar[str]  # how the factors make ΔW, named in a shape refusal

    def delta_weight(self, parts: Parts) -> torch.Tensor:
        raise NotImplementedError

    def delta_shape(self, parts: Parts) -> tuple[int, int]:
        raise NotImplementedError

    def fit_shape(self, parts: Parts) -> tuple[str, tuple[int, ...]] | None:
        return self.product, self.delta_shape(parts)

    def merge(self, param: torch.Tensor, parts: Parts) -> None:
        delta = self.delta_weight(parts)
        param.copy_((param.float() + delta.to(param.device)).to(param.dtype))


class LowRank(_Factored):
    """`::lora_A` (r × in), `::lora_B` (out × r), `::lora_scale`: ΔW = scale · B A (LoRA, SPT-LoRA)."""

    marker, dims, value_kinds = "lora_A", {"lora_A": 2, "lora_B": 2, "lora_scale": 0}, ("lora_A", "lora_B")
    product = "lora_B @ lora_A"

    def check_alone(self, name: str, parts: Parts, where: str) -> None:
        if parts["lora_B"].shape[1] != parts["lora_A"].shape[0]:
            raise mismatch(where, name, parts, "lora_B", "lora_A")

    def delta_weight(self, parts: Parts) -> torch.Tensor:
        return (parts["lora_B"].float() @ parts["lora_A"].float()) * parts["lora_scale"].float()

    def delta_shape(self, parts: Parts) -> tuple[int, int]:
        return parts["lora_B"].shape[0], parts["lora_A"].shape[-1]


class SVDTriplets(_Factored):
    """`::svd_P` (out × r), `::svd_E` (r), `::svd_Q` (r × in), `::svd_scale`: ΔW = scale · P diag(E) Q (AdaLoRA)."""

    marker = "svd_P"
    dims, value_kinds = {"svd_P": 2, "svd_E": 1, "svd_Q": 2, "svd_scale": 0}, ("svd_P", "svd_E", "svd_Q")
    product = "svd_P @ svd_Q"

    def check_alone(self, name: str, parts: Parts, where: str) -> None:
        rank = parts["svd_E"].numel()
        if parts["svd_P"].shape[1] != rank:
            raise mismatch(where, name, parts, "svd_P", "svd_E")
        if parts["svd_Q"].shape[0] != rank:
            raise mismatch(where, name, parts, "svd_Q", "svd_E")

    def delta_weight(self, parts: Parts) -> torch.Tensor:
        p, e, q = parts["svd_P"].float(), parts["svd_E"].float(), parts["svd_Q"].float()
        return (p * e) @ q * parts["svd_scale"].float()

    def delta_shape(self, parts: Parts) -> tuple[int, int]:
        return parts["svd_P"].shape[0], parts["svd_Q"].shape[-1]


class AxisScale(Form):
    """`::ia3_scale` (a vector) and `::ia3_axis` (an integer, 0: rows, the output side; 1: columns, the
    input side): W ← diag(l) W or W diag(l). Any method that scales a Linear's outputs or inputs stores
    this (IA³ first, whose names the kinds keep so stored files stay readable). The axis is an integer;
    a float axis, as files written before it was one hold, is read as its integer."""

    marker, dims, value_kinds = "ia3_scale", {"ia3_scale": 1, "ia3_axis": 0}, ("ia3_scale",)
    dtypes = {"ia3_axis": (torch.int32, torch.int64, torch.uint8, torch.int8, torch.float32)}

    def expand(self, name: str, parts: Parts, where: str) -> Parts:
        axis = parts.get("ia3_axis")
        if axis is None or not axis.is_floating_point():
            return parts
        self.check_alone(name, parts, where)
        return {**parts, "ia3_axis": axis.to(torch.int32)}

    def check_alone(self, name: str, parts: Parts, where: str) -> None:
        axis = parts["ia3_axis"]
        if axis.numel() != 1 or axis.item() not in (0, 1):
            raise SelectuneError(f"{where}: '{name}::ia3_axis' is {axis.tolist()}, not 0 or 1")

    def check_fit(self, name: str, parts: Parts, param: torch.Tensor, model: nn.Module, where: str,
                  resize_head: bool = False) -> None:
        axis = int(parts["ia3_axis"])
        if param.dim() != 2 or param.shape[axis] != parts["ia3_scale"].numel():
            raise SelectuneError(f"{where}: '{name}::ia3_scale' has {parts['ia3_scale'].numel()} entries but the "
                                 f"model's tensor is {tuple(param.shape)} (a delta for another base model?)")

    def merge(self, param: torch.Tensor, parts: Parts) -> None:
        scale = parts["ia3_scale"].float().to(param.device)
        scale = scale[:, None] if int(parts["ia3_axis"]) == 0 else scale[None, :]
        param.copy_((param.float() * scale).to(param.dtype))


class Adapter(Form):
    """`::adapter_*`: a bottleneck Adapter beside a Linear. Not linear in x, so it never merges: applying
    attaches an `AdapterLinear` sharing the Linear's own weight and bias; undo puts the Linear back.
    Export writes it beside the merged model (adapters.safetensors)."""

    marker, value_kinds, merges, ships_beside = "adapter_up_weight", ADAPTER_KINDS, False, True
    dims = {"adapter_down_weight": 2, "adapter_down_bias": 1, "adapter_up_weight": 2, "adapter_up_bias": 1}

    def check_alone(self, name: str, parts: Parts, where: str) -> None:
        width = parts["adapter_down_weight"].shape[0]
        out = parts["adapter_up_weight"].shape[0]
        if parts["adapter_down_bias"].numel() != width:
            raise mismatch(where, name, parts, "adapter_down_bias", "adapter_down_weight")
        if parts["adapter_up_weight"].shape[1] != width:
            raise mismatch(where, name, parts, "adapter_up_weight", "adapter_down_weight")
        if parts["adapter_up_bias"].numel() != out:
            raise mismatch(where, name, parts, "adapter_up_bias", "adapter_up_weight")

    def fit_shape(self, parts: Parts) -> tuple[str, tuple[int, ...]] | None:
        return "adapter", (parts["adapter_up_weight"].shape[0], parts["adapter_down_weight"].shape[1])

    def check_fit(self, name: str, parts: Parts, param: torch.Tensor, model: nn.Module, where: str,
                  resize_head: bool = False) -> None:
        module = model.get_submodule(name.rpartition(".")[0])
        if not isinstance(module, nn.Linear) or name.rpartition(".")[2] != "weight":
            raise SelectuneError(f"{where}: '{name}' has an Adapter but is not a Linear layer's weight")
        super().check_fit(name, parts, param, model, where)

    def merge(self, param: torch.Tensor, parts: Parts) -> None:
        raise SelectuneError("an Adapter cannot be merged into a weight; attach it (apply) instead")

    @torch.no_grad()
    def apply(self, model: nn.Module, name: str, parts: Parts) -> Undo:
        module_name = name.rpartition(".")[0]
        linear = model.get_submodule(module_name)
        replace_module(model, module_name, AdapterLinear.from_entries(linear, parts))
        return Undo(name, lambda: replace_module(model, module_name, linear), 0)


# Application order: a whole new value first, then what adds to or scales a weight.
FORMS: dict[str, Form] = {}


def register(form: Form) -> Form:
    """Add a stored form; its marker and kinds must not clash with a registered one."""
    taken = {k for f in FORMS.values() for k in (*f.kinds, *f.compact_kinds)}
    if form.marker in FORMS or taken & {*form.kinds, *form.compact_kinds}:
        raise ValueError(f"delta form {type(form).__name__}: kinds {form.kinds} clash with a registered form")
    FORMS[form.marker] = form
    return form


for _form in (DenseSet(), SparseEntries(), SVDTriplets(), LowRank(), AxisScale(), Adapter()):
    register(_form)


def registered() -> dict[str, Form]:
    """Every stored form, in application order (the generic ones above and any registered since)."""
    return FORMS


def kinds() -> tuple[str, ...]:
    """Every stored kind of every registered form (the plain file form)."""
    return tuple(k for form in FORMS.values() for k in form.kinds)


def file_kinds() -> tuple[str, ...]:
    """Every kind a delta file may hold: the plain kinds and those of the compact form."""
    return tuple(k for form in FORMS.values() for k in (*form.kinds, *form.compact_kinds))


def value_kinds() -> tuple[str, ...]:
    return tuple(k for form in FORMS.values() for k in form.value_kinds)


def forms_of(name: str, parts: Parts) -> list[Form]:
    """The forms one parameter's group holds, in application order; a kind no form claims is an error."""
    found = [form for form in FORMS.values() if form.holds(parts)]
    claimed = {k for form in found for k in (*form.kinds, *form.compact_kinds)}
    stray = sorted(set(parts) - claimed)
    if stray:
        raise SelectuneError(f"task delta: '{name}' has {', '.join(stray)} without the entries that go with them")
    return found


def mismatch(where: str, name: str, parts: Parts, a: str, b: str) -> SelectuneError:
    return SelectuneError(f"{where}: '{name}::{a}' {tuple(parts[a].shape)} does not match "
                          f"'::{b}' {tuple(parts[b].shape)}")


def _check_index_range(name: str, idx: torch.Tensor, where: str) -> None:
    if int(idx.min()) < 0:
        raise SelectuneError(f"{where}: '{name}::indices' holds a negative index ({int(idx.min())})")
    if int(idx.max()) > MAX_INDEX:
        raise SelectuneError(f"{where}: '{name}::indices' holds {int(idx.max())}, beyond int32")


def _resize_linear(module: nn.Module) -> None:
    """Keep a Linear's `out_features` in step with a swapped head weight (its repr and shape checks)."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and weight is not None:
        module.out_features, module.in_features = weight.shape


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
