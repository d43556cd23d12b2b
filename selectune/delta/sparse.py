"""The sparse delta form (methods.md §3; design.md "SparseDelta"): W = W0 + scatter(indices, values).

Per target tensor: a 1-D trainable `values` vector and sorted int32 flat `indices` (a buffer). The
base tensor stays frozen with no gradient buffer; optimiser state exists only for `values`.

For a Linear weight the backward never builds the dense weight gradient it would then gather from:
the gradient of entry k = (row r_k, column c_k) is computed directly,
    dv_k = Σ_tokens dy[t, r_k] · x[t, c_k]
in chunks of entries, so memory stays O(tokens · chunk) and a step costs about what LoRA's does.
Other tensors (biases, LayerNorm, embeddings) are small or get a dense gradient from their own op
anyway (embedding backward), so they use a generic scatter-add whose backward gathers.

Wrapping keeps every pretrained parameter under its own name; the trainable vector of tensor `t` is
`<t>_delta` on the same module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

# Entries per chunk of the sparse weight gradient: bounds the (tokens x chunk) temporaries to ~64 MB.
GRAD_CHUNK_ELEMENTS = 16 * 2**20


def scatter_add(base: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """base + scatter(indices, values), as a new tensor (the base is left untouched)."""
    out = base.detach().clone().reshape(-1)
    out.index_add_(0, indices.long(), values.to(out.dtype))
    return out.view_as(base)


class _SparseLinear(torch.autograd.Function):
    """y = x (W0 + S)^T + b with S = scatter(idx, values); gradients for x, values and b only."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, in_features):  # type: ignore[override]
        effective = scatter_add(weight, indices, values)
        ctx.save_for_backward(x, weight, values, indices)
        ctx.in_features = in_features
        ctx.has_bias = bias is not None
        return F.linear(x, effective, bias)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, values, indices = ctx.saved_tensors
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            effective = scatter_add(weight, indices, values)  # recomputed: no dense copy kept alive
            grad_x = dy @ effective.to(dy.dtype)
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.needs_input_grad[3]:
            x2 = x.reshape(-1, x.shape[-1])
            rows = torch.div(indices, ctx.in_features, rounding_mode="floor").long()
            cols = (indices % ctx.in_features).long()
            acc = torch.promote_types(values.dtype, torch.float32)  # fp32 accumulation under autocast
            grad_values = torch.empty(values.shape, dtype=acc, device=values.device)
            chunk = max(1, GRAD_CHUNK_ELEMENTS // max(1, x2.shape[0]))
            for start in range(0, indices.numel(), chunk):
                sl = slice(start, start + chunk)
                grad_values[sl] = (dy2[:, rows[sl]].to(acc) * x2[:, cols[sl]].to(acc)).sum(0)
            grad_values = grad_values.to(values.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = dy2.sum(0)
        return grad_x, None, grad_bias, grad_values, None, None


class SparseDeltaModule(nn.Module):
    """Wraps one module; chosen tensors of it (`weight`, `bias`, ...) get a sparse trainable delta.

    The wrapped module's own parameters are re-registered here under their names (frozen), so the
    model's parameter names do not change; the wrapped module is kept unregistered and called with
    the effective tensors (a fast custom path for Linear weights).
    """

    def __init__(self, base: nn.Module, indices: dict[str, torch.Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "wrapped", base)  # not a submodule: its names stay the parent's
        for name, param in base.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.delta_names = sorted(indices)
        for name, idx in indices.items():
            self.set_indices(name, idx, torch.zeros(idx.numel(), dtype=torch.float32,
                                                    device=getattr(base, name).device))

    def set_indices(self, name: str, indices: torch.Tensor, values: torch.Tensor) -> None:
        """(Re)define the trainable entries of tensor `name` (sorted flat int32 indices + their values)."""
        device = getattr(self, name).device
        self.register_buffer(f"{name}_indices", indices.to(device=device, dtype=torch.int32), persistent=False)
        setattr(self, f"{name}_delta", nn.Parameter(values.to(device=device, dtype=torch.float32)))

    def indices(self, name: str) -> torch.Tensor:
        return getattr(self, f"{name}_indices")

    def values(self, name: str) -> nn.Parameter:
        return getattr(self, f"{name}_delta")

    def forward(self, *args, **kwargs):
        base = self.wrapped
        if isinstance(base, nn.Linear) and "weight" in self.delta_names and not kwargs and len(args) == 1:
            bias = self.bias
            if "bias" in self.delta_names:
                bias = _GatherGrad.apply(self.bias, self.indices("bias"), self.values("bias"))
            return _SparseLinear.apply(args[0], self.weight, bias, self.values("weight"), self.indices("weight"),
                                       base.in_features)
        tensors = {n: _GatherGrad.apply(getattr(self, n), self.indices(n), self.values(n)) for n in self.delta_names}
        return functional_call(base, tensors, args, kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {self.indices(n).numel()} entries" for n in self.delta_names)


class _GatherGrad(torch.autograd.Function):
    """base + scatter(idx, values) for small / naturally dense-gradient tensors: dv = grad.flat[idx]."""

    @staticmethod
    def forward(ctx, base, indices, values):  # type: ignore[override]
        ctx.save_for_backward(indices)
        return scatter_add(base, indices, values)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        return None, None, grad.reshape(-1)[indices.long()].to(torch.float32)
