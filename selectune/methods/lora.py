"""LoRA (Hu et al., 2021) on the project's own low-rank delta form.

Targets are module-name suffixes (`query`, `value`, `attention.output.dense`, ...), matched against
nn.Linear modules outside the head. With a budget, the rank is the largest r whose stored count
(head included) fits it, so LoRA can be compared with sparse methods at the same stored count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from selectune.backbone import Backbone
from selectune.delta.lowrank import LowRankLinear
from selectune.delta.wrapping import find_linears, replace_module
from selectune.errors import SelectuneError
from selectune.methods.base import Method, MethodConfig, ProbeBatches, register


@dataclass
class LoRAConfig(MethodConfig):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["query", "value", "q_proj", "v_proj"])


@register("lora")
class LoRA(Method):
    Config = LoRAConfig
    uses_budget = True
    cfg: LoRAConfig

    def setup(self, backbone: Backbone, probe: ProbeBatches | None) -> None:
        linears = find_linears(backbone.model, self.cfg.targets, backbone.head_names)
        rank = self.cfg.r
        if self.budget is not None:
            head = backbone.num_head_parameters
            per_rank = sum(m.in_features + m.out_features for m in linears.values())
            rank = (self.budget - head) // per_rank
            if rank < 1:
                raise SelectuneError(f"budget of {self.budget:,} cannot hold LoRA rank 1 on {len(linears)} "
                                     f"matrices ({per_rank + head:,} values with the head)")
        self.rank = rank
        for name, linear in linears.items():
            replace_module(backbone.model, name, LowRankLinear(linear, rank, self.cfg.alpha, self.cfg.dropout))
        self.wrapped = {name: backbone.model.get_submodule(name) for name in linears}

    def method_delta(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, module in self.wrapped.items():
            out.update(module.delta_entries(f"{name}.weight"))
        return out
