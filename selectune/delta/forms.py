"""Delta forms as stored: each form owns the TaskDelta kinds it writes and merges / un-merges itself.

A TaskDelta groups its entries per parameter (`<name>::<kind>`); which form a group holds is told by
one marker kind (`set`, `indices`, `svd_P`, `lora_A`, `adapter_up_weight`). Every form here
    declares   `ranks` (the kinds it stores, with their dimensions) and `value_kinds` (which count),
    checks     a group read from a file on its own (`check_alone`) and against the model (`check_fit`),
    checks     a group against the model's parameter before an in-place apply (`check`),
    merges     the group into the parameter in place, in fp32 (export and `TaskDelta.merge_into`),
    applies    the same merge and returns an `Undo` holding exactly what restores the base bit for bit:
               the base values at the touched indices (sparse), the replaced tensor (dense, low-rank,
               SVD) or the replaced module (Adapters, which cannot merge and are attached instead).
Undoing never subtracts: W0 + Δ − Δ is not W0 in floating point, a copy of W0's touched part is.
`TaskDelta` and the in-place API (`selectune.api`) dispatch through `FORMS` (peft's
`get_delta_weight`/`merge`/`unmerge` split); a new stored form is one subclass registered here.
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


@dataclass
class Undo:
    """What one applied group needs to be taken back; `restore()` puts the base back exactly."""

    name: str
    restore: Callable[[], None]
    held: int  # bytes kept to undo (what an active delta costs beyond its own tensors)


class Form:
    """One stored delta form. Subclasses set the class attributes and `merge` (and `apply` when
    a plain copy of the parameter is not the cheapest exact undo); `check_alone` and `check_fit` are
    what a delta file read from disk must pass before anything is written (`TaskDelta.checked`)."""

    marker: ClassVar[str]  # the kind whose presence says a group holds this form
    ranks: ClassVar[dict[str, int | None]]  # every kind it stores, with its number of dimensions (None: any)
    value_kinds: ClassVar[tuple[str, ...]]  # the kinds whose numbers count as stored
    merges: ClassVar[bool] = True  # False: a module, attached rather than written into the weight

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.ranks)

    def check_alone(self, name: str, parts: Parts, where: str) -> None:
        """The lengths and inner dimensions that must agree within the group (no model needed); the
        kinds are all present with their ranks and finite values by then."""

    def fit_shape(self, parts: Parts) -> tuple[str, tuple[int, ...]] | None:
        """(what, shape) of the weight this group changes, to compare with the model's tensor."""
        return None

    def check_fit(self, name: str, parts: Parts, param: torch.Tensor, model: nn.Module, where: str) -> None:
        """The group against the model's tensor (`TaskDelta.check_fits`)."""
        fit = self.fit_shape(parts)
        if fit is not None and tuple(fit[1]) != tuple(param.shape):
            raise SelectuneError(f"{where}: '{name}' ({fit[0]}) has shape {tuple(fit[1])} but the model's is "
                                 f"{tuple(param.shape)} (a delta for another base model?)")

    def check(self, name: str, parts: Parts, param: torch.Tensor, resize_head: bool = False) -> None:
        """Raise a SelectuneError if the group cannot be written into `param` (shape, missing kinds);
        `resize_head`: a head of another shape may replace the model's (in-place apply, not merge)."""
        missing = [k for k in self.kinds if k not in parts]
        if missing:
            raise SelectuneError(f"task delta: '{name}' lacks {', '.join(missing)} (a {self.marker} entry needs them)")

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
    """`::set`: the tensor's new value, whole (the head, full fine-tuning, BitFit biases). A head of
    another label count replaces the classifier's Parameter (shape and all); the old one is kept."""

    marker, ranks, value_kinds = "set", {"set": None}, ("set",)

    def fit_shape(self, parts: Parts) -> tuple[str, tuple[int, ...]] | None:
        return "set", tuple(parts["set"].shape)

    def check(self, name: str, parts: Parts, param: torch.Tensor, resize_head: bool = False) -> None:
        if not (resize_head and name.startswith(HEAD_PREFIXES)):
            check_shape(name, parts["set"].shape, param.shape)

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
    Undo keeps the base values at those indices only."""

    marker, ranks, value_kinds = "indices", {"indices": 1, "values": 1}, ("values",)

    def check_alone(self, name: str, parts: Parts, where: str) -> None:
        idx = parts["indices"]
        if idx.numel() != parts["values"].numel():
            raise mismatch(where, name, parts, "indices", "values")
        if idx.numel():
            if int(idx.min()) < 0:
                raise SelectuneError(f"{where}: '{name}::indices' holds a negative index ({int(idx.min())})")
            if int(idx.max()) > MAX_INDEX:
                raise SelectuneError(f"{where}: '{name}::indices' holds {int(idx.max())}, beyond int32")
            steps = idx[1:] > idx[:-1]
            if not bool(steps.all()):
                at = int((~steps).nonzero()[0])
                problem = "duplicated" if int(idx[at]) == int(idx[at + 1]) else "not sorted"
                raise SelectuneError(f"{where}: '{name}::indices' are {problem} (position {at + 1}: "
                                     f"{int(idx[at])} then {int(idx[at + 1])})")

    def check_fit(self, name: str, parts: Parts, param: torch.Tensor, model: nn.Module, where: str) -> None:
        if parts["indices"].numel() and int(parts["indices"].max()) >= param.numel():
            raise SelectuneError(f"{where}: '{name}::indices' holds index {int(parts['indices'].max())}, but the "
                                 f"model's tensor has {param.numel()} entries (a delta for another base model?)")

    def check(self, name: str, parts: Parts, param: torch.Tensor, resize_head: bool = False) -> None:
        super().check(name, parts, param)
        idx = parts["indices"]
        if parts["values"].shape != idx.shape:
            raise SelectuneError(f"task delta: '{name}' has {idx.numel():,} indices but {parts['values'].numel():,} "
                                 f"values")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= param.numel()):
            raise SelectuneError(f"task delta: '{name}' has indices outside its {param.numel():,} entries "
                                 f"(a delta for another base model?)")

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

    def check(self, name: str, parts: Parts, param: torch.Tensor, resize_head: bool = False) -> None:
        super().check(name, parts, param)
        check_shape(name, self.delta_shape(parts), param.shape)

    def delta_shape(self, parts: Parts) -> tuple[int, int]:
        raise NotImplementedError

    def fit_shape(self, parts: Parts) -> tuple[str, tuple[int, ...]] | None:
        return self.product, self.delta_shape(parts)

    def merge(self, param: torch.Tensor, parts: Parts) -> None:
        delta = self.delta_weight(parts)
        param.copy_((param.float() + delta.to(param.device)).to(param.dtype))


class LowRank(_Factored):
    """`::lora_A` (r × in), `::lora_B` (out × r), `::lora_scale`: ΔW = scale · B A (LoRA)."""

    marker, ranks, value_kinds = "lora_A", {"lora_A": 2, "lora_B": 2, "lora_scale": 0}, ("lora_A", "lora_B")
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
    ranks, value_kinds = {"svd_P": 2, "svd_E": 1, "svd_Q": 2, "svd_scale": 0}, ("svd_P", "svd_E", "svd_Q")
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


class Adapter(Form):
    """`::adapter_*`: a bottleneck Adapter beside a Linear. Not linear in x, so it never merges: applying
    attaches an `AdapterLinear` sharing the Linear's own weight and bias; undo puts the Linear back."""

    marker, value_kinds, merges = "adapter_up_weight", ADAPTER_KINDS, False
    ranks = {"adapter_down_weight": 2, "adapter_down_bias": 1, "adapter_up_weight": 2, "adapter_up_bias": 1}

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

    def check_fit(self, name: str, parts: Parts, param: torch.Tensor, model: nn.Module, where: str) -> None:
        module = model.get_submodule(name.rpartition(".")[0])
        if not isinstance(module, nn.Linear) or name.rpartition(".")[2] != "weight":
            raise SelectuneError(f"{where}: '{name}' has an Adapter but is not a Linear layer's weight")
        super().check_fit(name, parts, param, model, where)

    def check(self, name: str, parts: Parts, param: torch.Tensor, resize_head: bool = False) -> None:
        super().check(name, parts, param)
        check_shape(name, self.fit_shape(parts)[1], param.shape)

    def merge(self, param: torch.Tensor, parts: Parts) -> None:
        raise SelectuneError("an Adapter cannot be merged into a weight; attach it (apply) instead")

    @torch.no_grad()
    def apply(self, model: nn.Module, name: str, parts: Parts) -> Undo:
        module_name = name.rpartition(".")[0]
        linear = model.get_submodule(module_name)
        replace_module(model, module_name, AdapterLinear.from_entries(linear, parts))
        return Undo(name, lambda: replace_module(model, module_name, linear), 0)


# Application order: a whole new value first, then what adds to a weight.
FORMS: dict[str, Form] = {}


def register(form: Form) -> Form:
    """Add a stored form; its marker and kinds must not clash with a registered one."""
    taken = {k for f in FORMS.values() for k in f.kinds}
    if form.marker in FORMS or taken & set(form.kinds):
        raise ValueError(f"delta form {type(form).__name__}: kinds {form.kinds} clash with a registered form")
    FORMS[form.marker] = form
    return form


for _form in (DenseSet(), SparseEntries(), SVDTriplets(), LowRank(), Adapter()):
    register(_form)


def registered() -> dict[str, Form]:
    """Every stored form: the ones above and those a method module registers beside its method (importing
    `selectune.methods` imports every method module), so a delta of any registered method reads back."""
    import selectune.methods  # noqa: F401 (registers the forms method modules define)

    return FORMS


def kinds() -> tuple[str, ...]:
    """Every stored kind of every registered form."""
    return tuple(k for form in registered().values() for k in form.kinds)


def value_kinds() -> tuple[str, ...]:
    return tuple(k for form in registered().values() for k in form.value_kinds)


def forms_of(name: str, parts: Parts) -> list[Form]:
    """The forms one parameter's group holds, in application order; a kind no form claims is an error."""
    found = [form for marker, form in registered().items() if marker in parts]
    claimed = {k for form in found for k in form.kinds}
    stray = sorted(set(parts) - claimed)
    if stray:
        raise SelectuneError(f"task delta: '{name}' has {', '.join(stray)} without the entries that go with them")
    return found


def mismatch(where: str, name: str, parts: Parts, a: str, b: str) -> SelectuneError:
    return SelectuneError(f"{where}: '{name}::{a}' {tuple(parts[a].shape)} does not match "
                          f"'::{b}' {tuple(parts[b].shape)}")


def check_shape(name: str, got: tuple[int, ...] | torch.Size, want: tuple[int, ...] | torch.Size) -> None:
    if tuple(got) != tuple(want):
        raise SelectuneError(f"task delta: '{name}' has shape {tuple(got)} but the model's is {tuple(want)} "
                             f"(a delta for another base model?)")


def _resize_linear(module: nn.Module) -> None:
    """Keep a Linear's `out_features` in step with a swapped head weight (its repr and shape checks)."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and weight is not None:
        module.out_features, module.in_features = weight.shape


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
