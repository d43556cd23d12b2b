"""LN-tuning (Qi et al., 2022, "Parameter-efficient tuning on layer normalization for pre-trained language
models", arXiv 2211.08682): only the LayerNorm gains and biases train, besides the task head.

Every normalisation layer of the backbone outside the head counts (nn.LayerNorm, and transformers' own
LayerNorm / RMSNorm classes, matched by class name since they are not nn.LayerNorm subclasses). Each trained
tensor is stored whole as its new value, `<param>::set`: on MiniLM that is 13 LayerNorms of 2 · 384 values,
9,984 in all (0.04% of its weights). Nothing is wrapped, so the stored delta merges into a plain model and
the method needs no form of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from selectune.backbone import Backbone
from selectune.errors import SelectuneError
from selectune.methods.base import Method, MethodConfig, ProbeBatches, register

NORM_CLASSES = ("LayerNorm", "RMSNorm")  # class-name endings of the normalisation layers tuned


@dataclass
class LNTuningConfig(MethodConfig):
    pass


def norm_parameters(model: nn.Module, head: frozenset[str]) -> list[str]:
    """The parameter names of every normalisation layer of `model` outside the head, in model order."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(NORM_CLASSES):
            names += [f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False)]
    return [n for n in names if n not in head]


@register("ln_tuning")
class LNTuning(Method):
    Config = LNTuningConfig
    cfg: LNTuningConfig

    def setup(self, backbone: Backbone, probe: ProbeBatches | None) -> None:
        self.names = norm_parameters(backbone.model, backbone.head_names)
        if not self.names:
            raise SelectuneError(f"method {self.cfg.name}: the model has no LayerNorm outside its head")
        for name in self.names:
            backbone.model.get_parameter(name).requires_grad_(True)

    def method_delta(self) -> dict[str, torch.Tensor]:
        return {f"{n}::set": self.model.get_parameter(n) for n in self.names}

    def describe(self) -> dict[str, int]:
        return {"norm_tensors": len(self.names)}
