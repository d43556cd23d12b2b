"""The SVD-form delta of AdaLoRA (docs/methods.md, AdaLoRA): ΔW = P diag(λ) Q · scale.

P (out × r) and Q (r × in) ~ N(0, 0.02), λ = 0 at the start (so training starts at the base);
scale = alpha / r with r the initial rank (the reference's `ranknum`, kept constant). Pruning a
triplet i zeroes λ_i only: P[:, i] and Q[i] keep training, so a pruned triplet can come back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SVDLinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_P = nn.Parameter(torch.randn(base.out_features, r, device=device, dtype=dtype) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, device=device, dtype=dtype))
        self.lora_Q = nn.Parameter(torch.randn(r, base.in_features, device=device, dtype=dtype) * 0.02)
        self.scale = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SVDLinearFn.apply(x, self.weight, self.bias, self.lora_P, self.lora_E, self.lora_Q, self.scale)

    def orthogonality(self, squared: bool = True) -> torch.Tensor:
        """‖PᵀP − I‖_F² + ‖QQᵀ − I‖_F² (the paper), or the unsquared norms (the reference code)."""
        eye = torch.eye(self.lora_E.numel(), device=self.lora_E.device, dtype=self.lora_P.dtype)
        terms = [self.lora_P.t() @ self.lora_P - eye, self.lora_Q @ self.lora_Q.t() - eye]
        if squared:
            return sum(t.square().sum() for t in terms)
        return sum(torch.linalg.matrix_norm(t) for t in terms)

    def delta_entries(self, weight_name: str, keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """TaskDelta entries; with `keep` (bool per triplet) only the kept triplets are stored (trimmed)."""
        p, e, q = self.lora_P, self.lora_E, self.lora_Q
        if keep is not None:
            p, e, q = p[:, keep], e[keep], q[keep]
        return {f"{weight_name}::svd_P": p, f"{weight_name}::svd_E": e, f"{weight_name}::svd_Q": q,
                f"{weight_name}::svd_scale": torch.tensor(self.scale, dtype=torch.float32)}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.lora_E.numel()}, scale={self.scale:g}"


class _SVDLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b + scale · ((x Qᵀ) ⊙ λ) Pᵀ with the backward written out: the base product and the
    update accumulate into one output (addmm_), and x's gradient likewise, so a matrix costs ~14 kernels
    per step instead of ~20 through autograd (AdaLoRA adapts every matrix type: these add up). Under
    autocast the products run in the autocast dtype, as F.linear would, and P, λ, Q get their grads in
    their own dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, p, e, q, scale):  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, weight, bias)  # autocast (if on) picks the compute dtype here
        dt = y.dtype
        h = x2.to(dt) @ q.to(dt).t()
        he = h * e.to(dt)
        y.addmm_(he, p.to(dt).t(), alpha=scale)
        ctx.save_for_backward(x2, weight, p, e, q, h, he)
        ctx.scale, ctx.has_bias, ctx.lead = scale, bias is not None, x.shape[:-1]
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x2, weight, p, e, q, h, he = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dt, scale = dy2.dtype, ctx.scale
        gs = (dy2 @ p.to(dt)) * scale  # dL/d(h ⊙ λ)
        grad_p = None
        if ctx.needs_input_grad[3]:  # beta=0: scale · dyᵀ (h ⊙ λ) in one kernel, p's values ignored
            grad_p = torch.addmm(p.to(dt), dy2.t(), he, beta=0, alpha=scale).to(p.dtype)
        grad_e = (gs * h).sum(0).to(e.dtype) if ctx.needs_input_grad[4] else None
        dh = gs * e.to(dt)
        grad_q = (dh.t() @ x2.to(dt)).to(q.dtype) if ctx.needs_input_grad[5] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (dy2 @ weight.to(dt)).addmm_(dh, q.to(dt)).view(*ctx.lead, x2.shape[-1])
        grad_b = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b, grad_p, grad_e, grad_q, None


def orthogonality_terms(modules: list[SVDLinear], squared: bool) -> torch.Tensor:
    """Σ over `modules` of SVDLinear.orthogonality(squared), computed per shape group rather than per
    module: the factors Pᵀ and Q of one shape (r x n) are stacked and their Gram matrices taken with one batched
    product, so a step launches a few kernels per shape instead of ~20 per module. Equal to the per-module
    sum up to the order of the floating-point additions."""
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}  # Pᵀ and Q are both r x n: PᵀP and QQᵀ are X Xᵀ
    for m in modules:
        groups.setdefault(tuple(m.lora_Q.shape), []).append(m.lora_Q)
        groups.setdefault(tuple(m.lora_P.t().shape), []).append(m.lora_P.t())
    total = None
    for factors in groups.values():
        stacked = torch.stack(factors)
        gram = stacked @ stacked.transpose(1, 2)
        eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
        diff = gram - eye
        term = diff.square().sum() if squared else torch.linalg.matrix_norm(diff).sum()
        total = term if total is None else total + term
    assert total is not None, "no AdaLoRA module"
    return total
