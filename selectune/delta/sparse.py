"""The sparse delta form (docs/methods.md, SaRA; docs/design.md "SparseDelta"): W = W0 + scatter(indices, values).

Per target tensor: a 1-D trainable `values` vector and sorted int32 flat `indices` (a buffer). The
base tensor stays frozen with no gradient buffer; optimiser state exists only for `values`.

For a Linear weight the gradient of entry k = (row r_k, column c_k) is
    dv_k = Σ_tokens dy[t, r_k] · x[t, c_k],
computed per device (`method.sparse_grad`, "auto" by default):
  - `sddmm` (auto on CPU): a sampled dense-dense product, `torch.sparse.sampled_addmm` on the CSR
    pattern of the entries — measured 2-3x faster than dense-gradient-then-gather and >10x faster than
    gathering token columns on CPU with MiniLM shapes (docs/benchmarks.md). Where that kernel is missing
    (a dtype or device without it) the same sum is computed by gathering token columns in chunks.
  - `dense` (auto on CUDA): the dense product dyᵀx, then an index_select of the entries — what SpIEL and
    SHiRA do. On a GPU the extra GEMM costs what full fine-tuning pays for these matrices, while
    cuSPARSE's SDDMM pays a set-up per call (docs/benchmarks.md, "Selective steps shaped for a GPU"); under
    bf16 autocast it accumulates in fp32.
Everything index-shaped is prepared once per selection (`set_entries`: at wrapping, SaRA's
re-selection, resume, diff pruning's projection) as non-persistent buffers that follow `.to()`: the int64
flat index, and for Linear weights the rows, columns and CSR row pointer. A step does no index
arithmetic, no cast and nothing that reads a device value on the host (no bincount, nonzero, item).
Values and their gradients stay fp32 under autocast.
Other tensors (biases, LayerNorm, embeddings) are small or get a dense gradient from their own op
anyway (embedding backward), so they use a generic scatter-add whose backward gathers.

Wrapping keeps every pretrained parameter under its own name; the trainable vector of tensor `t` is
`<t>_delta` on the same module.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from selectune.delta.wrapping import by_module, replace_module
from selectune.errors import SelectuneError

# Entries per chunk of the sparse weight gradient: bounds the (tokens x chunk) temporaries to ~64 MB.
GRAD_CHUNK_ELEMENTS = 16 * 2**20


GRAD_MODES = ("auto", "dense", "sddmm")


class Pattern(NamedTuple):
    """The index tensors of one selection (see the module docstring), prepared once."""

    index: torch.Tensor  # int64 flat indices, sorted
    rows: torch.Tensor  # int64 row of each entry (Linear weights; empty otherwise)
    cols: torch.Tensor  # int64 column of each entry
    crow: torch.Tensor  # int64 CSR row pointer, out_features + 1 long


def prepare_pattern(indices: torch.Tensor, shape: tuple[int, ...] | None = None) -> Pattern:
    """The int64 index and, for a 2-D `shape`, the CSR pattern of sorted flat `indices`. Runs once per
    selection (its bincount syncs on CUDA: fine there, never inside a step)."""
    index = indices.to(torch.long)
    if shape is None or len(shape) != 2:
        empty = index.new_zeros(0)
        return Pattern(index, empty, empty, empty)
    out_features, in_features = shape
    rows = torch.div(index, in_features, rounding_mode="floor")
    crow = index.new_zeros(out_features + 1)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=out_features), 0)
    return Pattern(index, rows, index % in_features, crow)


def resolve_grad_mode(mode: str, device: torch.device) -> str:
    """`auto`: the dense product + gather on CUDA, the sampled product elsewhere (see module docstring)."""
    if mode not in GRAD_MODES:
        raise SelectuneError(f"method.sparse_grad='{mode}': use one of {', '.join(GRAD_MODES)}")
    if mode == "auto":
        return "dense" if device.type == "cuda" else "sddmm"
    return mode


def materialize(base: torch.Tensor, index: torch.Tensor, values: torch.Tensor, frozen_index: torch.Tensor,
                frozen_values: torch.Tensor) -> torch.Tensor:
    """W0 + scatter(trainable entries) + scatter(frozen entries), as a new tensor (W0 untouched): the
    out-of-place index_add copies and scatters in one operation."""
    flat = base.detach().reshape(-1).index_add(0, index, values.detach().to(base.dtype))
    if frozen_index.numel():
        flat.index_add_(0, frozen_index, frozen_values.to(base.dtype))
    return flat.view(base.shape)


def csr_pattern(pattern: Pattern, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The entries' CSR tensor (zero values) that sampled_addmm samples by: built once per selection,
    device and dtype by SparseDeltaModule, not per step."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(pattern.crow, pattern.cols,
                                       torch.zeros(pattern.index.numel(), dtype=dtype, device=pattern.index.device),
                                       shape, check_invariants=False)


def weight_grad(dy: torch.Tensor, x: torch.Tensor, pattern: Pattern, shape: tuple[int, int],
                mode: str, csr: torch.Tensor | None = None) -> torch.Tensor:
    """(dyᵀ x) at the pattern's entries of an (out, in) weight; `mode` dense or sddmm (resolved); `csr`:
    the prepared csr_pattern, used when its dtype and device match dy's."""
    if mode == "dense":
        return _dense_grad(dy, x).view(-1).index_select(0, pattern.index)
    try:
        if csr is None or csr.dtype != dy.dtype or csr.device != dy.device:
            csr = csr_pattern(pattern, shape, dy.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.sparse.sampled_addmm(csr, dy.t(), x, beta=0.0).values()
    except (RuntimeError, NotImplementedError):
        grad = torch.empty(pattern.index.numel(), dtype=dy.dtype, device=dy.device)
        chunk = max(1, GRAD_CHUNK_ELEMENTS // max(1, x.shape[0]))
        for start in range(0, pattern.index.numel(), chunk):
            sl = slice(start, start + chunk)
            grad[sl] = (dy[:, pattern.rows[sl]] * x[:, pattern.cols[sl]]).sum(0)
        return grad


def _dense_grad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dyᵀ x in fp32 at least: from bf16/fp16 operands on CUDA with fp32 output (no fp32 copies of dy and x)
    where this torch has `out_dtype`, else from fp32 copies."""
    acc = _acc_dtype(dy)
    if dy.dtype != acc and dy.is_cuda and dy.dtype == x.dtype:
        try:
            return torch.mm(dy.t(), x, out_dtype=acc)
        except (TypeError, RuntimeError):
            pass
    return dy.t().to(acc) @ x.to(acc)


def sampled_weight_grad(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor,
                        shape: tuple[int, int], mode: str = "sddmm") -> torch.Tensor:
    """(dyᵀ x) at the sorted flat `indices` of an (out, in) weight, preparing the pattern on the spot (for
    one-off calls and benchmarks; the training path prepares it once per selection)."""
    return weight_grad(dy, x, prepare_pattern(indices, shape), shape, resolve_grad_mode(mode, dy.device))


def effective(base: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, frozen_indices: torch.Tensor,
              frozen_values: torch.Tensor) -> torch.Tensor:
    """W0 + scatter(trainable entries) + scatter(frozen entries), as a new tensor (outside a step: casts)."""
    return materialize(base, indices.long(), values, frozen_indices.long(), frozen_values)


def _acc_dtype(values: torch.Tensor) -> torch.dtype:
    """The dtype weight gradients are accumulated in: fp32, or fp64 for fp64 tensors (tests). Decided in
    Python: torch.promote_types would be one more dispatched operation per matrix per step."""
    return torch.float64 if values.dtype == torch.float64 else torch.float32


class _SparseLinear(torch.autograd.Function):
    """y = x (W0 + S)^T + b with S = scatter(index, values) (+ frozen entries); grads for x, values, b."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, pattern, frozen_index, frozen_values, mode, csr):  # type: ignore[override]
        ctx.save_for_backward(x, weight, values, *pattern, frozen_index, frozen_values)
        ctx.has_bias, ctx.mode, ctx.csr = bias is not None, mode, csr
        return F.linear(x, materialize(weight, pattern.index, values, frozen_index, frozen_values), bias)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, values, index, rows, cols, crow, frozen_index, frozen_values = ctx.saved_tensors
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:  # W_eff recomputed: no dense copy is kept alive between passes
            grad_x = dy @ materialize(weight, index, values, frozen_index, frozen_values).to(dy.dtype)
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.needs_input_grad[3]:
            x2, acc = x.reshape(-1, x.shape[-1]), _acc_dtype(values)
            mode = resolve_grad_mode(ctx.mode, dy.device)
            if mode == "sddmm":  # fp32 accumulation under autocast
                dy2, x2 = dy2.to(acc), x2.to(acc)
            grad_values = weight_grad(dy2, x2, Pattern(index, rows, cols, crow), tuple(weight.shape), mode, ctx.csr)
            grad_values = grad_values.to(values.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = dy2.sum(0)
        return grad_x, None, grad_bias, grad_values, None, None, None, None, None


class SparseDeltaModule(nn.Module):
    """Wraps one module; chosen tensors of it (`weight`, `bias`, ...) get a sparse trainable delta.

    The wrapped module's own parameters are re-registered here under their names (frozen), so the
    model's parameter names do not change; the wrapped module is kept unregistered and called with
    the effective tensors (a fast custom path for Linear weights). Besides the trainable entries a
    tensor may hold frozen entries: deltas that stopped training (SaRA's progressive re-selection)
    but still belong to the task delta.
    """

    def __init__(self, base: nn.Module, indices: dict[str, torch.Tensor], grad_mode: str = "auto") -> None:
        super().__init__()
        object.__setattr__(self, "wrapped", base)  # not a submodule: its names stay the parent's
        for name, param in base.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, child in base.named_children():  # a module owning tensors and submodules (ViT embeddings)
            self.add_module(name, child)  # keeps its children's names and parameters in the model
        self.delta_names = sorted(indices)
        self.grad_mode = grad_mode
        self._csr: dict[str, torch.Tensor] = {}  # name -> csr_pattern (a cache: not a buffer, DDP broadcasts those)
        resolve_grad_mode(grad_mode, torch.device("cpu"))  # an unknown mode fails at wrapping, not in a step
        empty = torch.zeros(0)
        for name, idx in indices.items():
            self.set_entries(name, idx, torch.zeros(idx.numel()), empty.to(torch.int32), empty)

    def set_entries(self, name: str, indices: torch.Tensor, values: torch.Tensor, frozen_indices: torch.Tensor,
                    frozen_values: torch.Tensor) -> None:
        """(Re)define tensor `name`'s trainable entries (sorted flat indices + values) and frozen ones, and
        prepare their index tensors for the steps (the only place they are computed)."""
        device = getattr(self, name).device
        as_index = {"device": device, "dtype": torch.int32}
        as_value = {"device": device, "dtype": torch.float32}
        indices, frozen_indices = indices.to(**as_index), frozen_indices.to(**as_index)
        self.register_buffer(f"{name}_indices", indices, persistent=False)
        self.register_buffer(f"{name}_frozen_indices", frozen_indices, persistent=False)
        self.register_buffer(f"{name}_frozen_values", frozen_values.detach().to(**as_value), persistent=False)
        linear_weight = name == "weight" and isinstance(self.wrapped, nn.Linear)
        pattern = prepare_pattern(indices, tuple(self.weight.shape) if linear_weight else None)
        for field, tensor in zip(Pattern._fields, pattern, strict=True):
            self.register_buffer(f"{name}_{field}64", tensor, persistent=False)
        self.register_buffer(f"{name}_frozen_index64", frozen_indices.long(), persistent=False)
        self._csr.pop(name, None)
        setattr(self, f"{name}_delta", nn.Parameter(values.detach().to(**as_value)))

    def parts(self, name: str) -> tuple[torch.Tensor, nn.Parameter, torch.Tensor, torch.Tensor]:
        """(indices, trainable values, frozen indices, frozen values) of tensor `name` (int32 indices)."""
        return (getattr(self, f"{name}_indices"), getattr(self, f"{name}_delta"),
                getattr(self, f"{name}_frozen_indices"), getattr(self, f"{name}_frozen_values"))

    def pattern(self, name: str) -> Pattern:
        """The prepared index tensors of tensor `name`'s trainable entries."""
        return Pattern(*(getattr(self, f"{name}_{field}64") for field in Pattern._fields))

    def csr(self, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        """The CSR pattern of `name`'s entries for the sampled gradient (None on the dense path), cached per
        selection; rebuilt only when the module moved to another device or dtype."""
        pattern = self.pattern(name)
        if resolve_grad_mode(self.grad_mode, pattern.index.device) != "sddmm":
            return None
        shape = tuple(getattr(self, name).shape)
        cached = self._csr.get(name)
        if cached is None or cached.dtype != dtype or cached.device != pattern.index.device:
            cached = self._csr[name] = csr_pattern(pattern, shape, dtype)
        return cached

    def _step_parts(self, name: str) -> tuple[torch.Tensor, nn.Parameter, torch.Tensor, torch.Tensor]:
        """(int64 index, values, int64 frozen index, frozen values): what a step needs, nothing computed."""
        return (getattr(self, f"{name}_index64"), getattr(self, f"{name}_delta"),
                getattr(self, f"{name}_frozen_index64"), getattr(self, f"{name}_frozen_values"))

    def entries(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored entry of `name` (trainable and frozen), sorted by index: (indices, values)."""
        idx, values, f_idx, f_values = self.parts(name)
        all_idx, all_values = torch.cat([idx, f_idx]), torch.cat([values.detach(), f_values])
        order = torch.argsort(all_idx)
        return all_idx[order], all_values[order]

    def forward(self, *args, **kwargs):
        base = self.wrapped
        if not any(self.parts(n)[0].numel() + self.parts(n)[2].numel() for n in self.delta_names):
            return base(*args, **kwargs)
        if isinstance(base, nn.Linear) and "weight" in self.delta_names and not kwargs and len(args) == 1:
            bias = (_GatherGrad.apply(self.bias, *self._step_parts("bias")) if "bias" in self.delta_names
                    else base.bias)  # None for a bias-free Linear (Llama's), never registered here
            _, values, frozen_index, frozen_values = self._step_parts("weight")
            return _SparseLinear.apply(args[0], self.weight, bias, values, self.pattern("weight"), frozen_index,
                                       frozen_values, self.grad_mode, self.csr("weight", _acc_dtype(values)))
        tensors = {n: _GatherGrad.apply(getattr(self, n), *self._step_parts(n)) for n in self.delta_names}
        return functional_call(base, tensors, args, kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {self.parts(n)[0].numel()} trainable entries" for n in self.delta_names)


def wrap(model: nn.Module, selection: dict[str, torch.Tensor], grad_mode: str = "auto") -> dict[str, SparseDeltaModule]:
    """Give each selected parameter (name -> flat indices, possibly empty) a sparse delta, wrapping
    its owning module once; `grad_mode` = method.sparse_grad. Returns the wrappers by module name."""
    wrappers = {}
    for module_name, tensors in by_module(list(selection)).items():
        indices = {t: selection[f"{module_name}.{t}"] for t in tensors}
        wrappers[module_name] = SparseDeltaModule(unwrap(model.get_submodule(module_name)), indices, grad_mode)
        replace_module(model, module_name, wrappers[module_name])
    return wrappers


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module behind a delta-form wrapper (a module swapped twice wraps the original)."""
    return getattr(module, "wrapped", module)


def delta_entries(wrappers: dict[str, SparseDeltaModule]) -> dict[str, torch.Tensor]:
    """TaskDelta entries `<param>::indices` / `<param>::values` of every non-empty sparse delta."""
    out = {}
    for module_name, wrapper in wrappers.items():
        for name in wrapper.delta_names:
            idx, values = wrapper.entries(name)
            if idx.numel():
                out[f"{module_name}.{name}::indices"] = idx
                out[f"{module_name}.{name}::values"] = values
    return out


class _GatherGrad(torch.autograd.Function):
    """W0 + scatter(entries) for small or naturally dense-gradient tensors: dv = grad.flat[idx]."""

    @staticmethod
    def forward(ctx, base, index, values, frozen_index, frozen_values):  # type: ignore[override]
        ctx.save_for_backward(index)
        ctx.dtype = values.dtype
        return materialize(base, index, values, frozen_index, frozen_values)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (index,) = ctx.saved_tensors
        return None, None, grad.reshape(-1).index_select(0, index).to(ctx.dtype), None, None
