"""IA³ (Liu et al., NeurIPS 2022, arXiv 2205.05638): learned vectors that rescale activations.

Three vectors per transformer block, initialised to ones so training starts at the base model:
    keys and values      k = l_k ⊙ (W_k x + b_k),  v = l_v ⊙ (W_v x + b_v)        (the Linear's output)
    feed-forward         y = W_2 (l_ff ⊙ h) + b_2,  h = act(W_1 x + b_1)          (the second Linear's input)
On MiniLM that is 2 · 384 + 1,536 values per layer, 13,824 in all (0.06% of its weights), besides the head.

Stored per task as the generic row/column scale (`selectune.delta.forms.AxisScale`): `<weight>::ia3_scale`
(the vector) with `::ia3_axis` (an int32, 0: rows, the output side; 1: columns, the input side); merging
scales the weight's rows or columns,
W ← diag(l) W or W diag(l), exactly what the wrapper computes. An output-side vector also scales the
bias, which is stored as its merged value (`<bias>::set`, l ⊙ b): the scaled output of a Linear is
(l ⊙ W) x + l ⊙ b. `targets` / `feedforward` are module-name suffixes as in LoRA; BERT's and ViT's
feed-forward output is `output.dense`, whose suffix `attention.output.dense` shares, so modules
matching `exclude` are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from selectune.backbone import Backbone
from selectune.delta.wrapping import find_linears, replace_module
from selectune.errors import SelectuneError
from selectune.methods.base import Method, MethodConfig, ProbeBatches, register


@dataclass
class IA3Config(MethodConfig):
    targets: list[str] = field(default_factory=lambda: ["key", "value", "k_proj", "v_proj"])  # output scaled
    feedforward: list[str] = field(default_factory=lambda: ["output.dense", "fc2", "down_proj"])  # input scaled
    exclude: list[str] = field(default_factory=lambda: ["attention.output.dense"])  # not feed-forward


class IA3Linear(nn.Module):
    """A Linear whose output (axis 0) or input (axis 1) is multiplied by a learned vector. It keeps the
    Linear's own `weight` and `bias` Parameters under their names (as every wrapper here does)."""

    def __init__(self, base: nn.Linear, axis: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.axis = base.in_features, base.out_features, axis
        self.weight, self.bias = base.weight, base.bias
        size = self.out_features if axis == 0 else self.in_features
        self.ia3_scale = nn.Parameter(torch.ones(size, device=base.weight.device, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis == 0:
            return F.linear(x, self.weight, self.bias) * self.ia3_scale
        return F.linear(x * self.ia3_scale, self.weight, self.bias)

    def delta_entries(self, module_name: str) -> dict[str, torch.Tensor]:
        out = {f"{module_name}.weight::ia3_scale": self.ia3_scale,
               f"{module_name}.weight::ia3_axis": torch.tensor(self.axis, dtype=torch.int32)}
        if self.axis == 0 and self.bias is not None:
            out[f"{module_name}.bias::set"] = self.bias * self.ia3_scale
        return out

    def extra_repr(self) -> str:
        side = "output" if self.axis == 0 else "input"
        return f"in={self.in_features}, out={self.out_features}, scales the {side}"


@register("ia3")
class IA3(Method):
    Config = IA3Config
    cfg: IA3Config

    def setup(self, backbone: Backbone, probe: ProbeBatches | None) -> None:
        model, head = backbone.model, backbone.head_names
        outputs = find_linears(model, self.cfg.targets, head)
        excluded = tuple(self.cfg.exclude)
        inputs = {n: m for n, m in find_linears(model, self.cfg.feedforward, head).items()
                  if n not in outputs and not any(n == e or n.endswith("." + e) for e in excluded)}
        if not inputs:
            raise SelectuneError(f"method.feedforward={list(self.cfg.feedforward)} (less method.exclude) matches no "
                                 f"Linear layer of the model")
        self.wrapped: dict[str, IA3Linear] = {}
        for axis, linears in ((0, outputs), (1, inputs)):
            for name, linear in linears.items():
                self.wrapped[name] = IA3Linear(linear, axis)
                replace_module(model, name, self.wrapped[name])

    def method_delta(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, module in self.wrapped.items():
            out.update(module.delta_entries(name))
        return out

    def describe(self) -> dict[str, object]:
        return {"scaled_outputs": sum(m.axis == 0 for m in self.wrapped.values()),
                "scaled_inputs": sum(m.axis == 1 for m in self.wrapped.values())}
