"""The low-rank delta form: W x + (B A) x · scale, with W frozen (LoRA, Hu et al. 2021).

The wrapper keeps the wrapped Linear's own `weight` and `bias` Parameters under the same names, so
parameter names, the base-weights hash and other methods' masks are unchanged by wrapping; the
factors are `lora_A` (r x in) and `lora_B` (out x r, zero-init so training starts at the base).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LowRankLinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def delta_entries(self, weight_name: str) -> dict[str, torch.Tensor]:
        """TaskDelta entries of this factor pair for the wrapped weight `weight_name`."""
        return {f"{weight_name}::lora_A": self.lora_A, f"{weight_name}::lora_B": self.lora_B,
                f"{weight_name}::lora_scale": torch.tensor(self.scale, dtype=torch.float32)}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.lora_A.shape[0]}, scale={self.scale:g}"
