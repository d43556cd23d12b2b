"""The baselines every comparison needs (docs/methods.md, baselines): full fine-tuning, BitFit, linear probe.

They make selective results meaningful: a row without its baseline proves nothing.
"""

from __future__ import annotations

import torch

from selectune.backbone import Backbone
from selectune.errors import SelectuneError
from selectune.methods.base import Method, ProbeBatches, register


@register("full")
class FullFineTune(Method):
    """Every parameter trains; the delta stores every tensor whole."""

    def setup(self, backbone: Backbone, probe: ProbeBatches | None) -> None:
        for param in backbone.model.parameters():
            param.requires_grad_(True)

    def method_delta(self) -> dict[str, torch.Tensor]:
        assert self.backbone is not None
        return {f"{n}::set": p for n, p in self.backbone.base_parameters().items()}


@register("bitfit")
class BitFit(Method):
    """Only the bias terms (and the head) train — Ben Zaken et al., 2022."""

    def setup(self, backbone: Backbone, probe: ProbeBatches | None) -> None:
        if not any(name.endswith(".bias") for name in backbone.base_names):
            raise SelectuneError(f"method bitfit: model '{backbone.name}' has no bias terms (Llama-style layers "
                                 f"are bias-free), so BitFit would train nothing; pick another method")
        for name, param in backbone.base_parameters().items():
            param.requires_grad_(name.endswith(".bias"))

    def method_delta(self) -> dict[str, torch.Tensor]:
        assert self.backbone is not None
        return {f"{n}::set": p for n, p in self.backbone.base_parameters().items() if n.endswith(".bias")}


@register("linear")
class LinearProbe(Method):
    """Only the head trains: the floor any tuning method must beat."""

    def setup(self, backbone: Backbone, probe: ProbeBatches | None) -> None:
        if not backbone.head_names:
            raise SelectuneError(f"method linear: model '{backbone.name}' has no new head to train (a causal LM "
                                 f"answers with its own output embedding); pick another method")

    def method_delta(self) -> dict[str, torch.Tensor]:
        return {}
