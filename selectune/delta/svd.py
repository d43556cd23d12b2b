"""The SVD-form delta of AdaLoRA (methods.md §5): ΔW = P diag(λ) Q · scale.

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
        update = F.linear(F.linear(x, self.lora_Q) * self.lora_E, self.lora_P)
        return F.linear(x, self.weight, self.bias) + update * self.scale

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


def orthogonality_terms(modules: list[SVDLinear], squared: bool) -> torch.Tensor:
    """Σ over `modules` of SVDLinear.orthogonality(squared), computed per shape group rather than per
    module: the P (and Q) factors of one shape are stacked and their Gram matrices taken with one batched
    product, so a step launches a few kernels per shape instead of ~20 per module. Equal to the per-module
    sum up to the order of the floating-point additions."""
    groups: dict[tuple[str, tuple[int, ...]], list[torch.Tensor]] = {}
    for m in modules:
        groups.setdefault(("P", tuple(m.lora_P.shape)), []).append(m.lora_P)
        groups.setdefault(("Q", tuple(m.lora_Q.shape)), []).append(m.lora_Q)
    total = None
    for (kind, _), factors in groups.items():
        stacked = torch.stack(factors)
        gram = stacked.transpose(1, 2) @ stacked if kind == "P" else stacked @ stacked.transpose(1, 2)
        eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
        diff = gram - eye
        term = diff.square().sum() if squared else torch.linalg.matrix_norm(diff).sum()
        total = term if total is None else total + term
    assert total is not None, "no AdaLoRA module"
    return total
