"""A bottleneck Adapter in parallel to a frozen Linear (SPT-Adapter, docs/methods.md, SPT):

    y = W x + b + up(GELU(down(x)))      down: in -> r, up: r -> out (zero-init: training starts at the base)

Unlike LoRA it is not linear in x, so it can never be merged into W: it is stored as four tensors
(`::adapter_down_weight`, `::adapter_down_bias`, `::adapter_up_weight`, `::adapter_up_bias`) and re-attached
as a module when a delta is applied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("adapter_down_weight", "adapter_down_bias", "adapter_up_weight", "adapter_up_bias")


class AdapterLinear(nn.Module):
    def __init__(self, base: nn.Linear, width: int) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        device, dtype = base.weight.device, base.weight.dtype
        self.adapter_down = nn.Linear(base.in_features, width, device=device, dtype=dtype)
        self.adapter_up = nn.Linear(width, base.out_features, device=device, dtype=dtype)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.adapter_up(F.gelu(self.adapter_down(x)))

    def delta_entries(self, weight_name: str) -> dict[str, torch.Tensor]:
        return {f"{weight_name}::adapter_down_weight": self.adapter_down.weight,
                f"{weight_name}::adapter_down_bias": self.adapter_down.bias,
                f"{weight_name}::adapter_up_weight": self.adapter_up.weight,
                f"{weight_name}::adapter_up_bias": self.adapter_up.bias}

    @classmethod
    def from_entries(cls, base: nn.Linear, parts: dict[str, torch.Tensor]) -> AdapterLinear:
        module = cls(base, parts["adapter_down_weight"].shape[0])
        with torch.no_grad():
            module.adapter_down.weight.copy_(parts["adapter_down_weight"])
            module.adapter_down.bias.copy_(parts["adapter_down_bias"])
            module.adapter_up.weight.copy_(parts["adapter_up_weight"])
            module.adapter_up.bias.copy_(parts["adapter_up_bias"])
        return module
