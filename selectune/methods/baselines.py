"""The baselines every comparison needs (docs/methods.md, baselines): full fine-tuning, BitFit, linear probe.

They make selective results meaningful: a row without its baseline proves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selectune.backbone import Backbone
from selectune.errors import SelectuneError
from selectune.features import HeadModel, extract, head_plan
from selectune.methods.base import Method, MethodConfig, ProbeBatches, register
from selectune.tasks.batches import EncodedSplit


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


@dataclass
class LinearConfig(MethodConfig):
    # true: the frozen backbone runs once over each split (eval mode) and the head trains on the stored
    # features (selectune/features.py) — minutes become seconds; the same result in expectation, dropout
    # inside the frozen encoder being the one difference (off in the cached pass)
    cached: bool = False


@register("linear")
class LinearProbe(Method):
    """Only the head trains: the floor any tuning method must beat."""

    Config = LinearConfig

    def __init__(self, cfg: LinearConfig, budget: int | None) -> None:
        super().__init__(cfg, budget)
        self.head: HeadModel | None = None  # cached: the head the loop trains on the stored features

    def setup(self, backbone: Backbone, probe: ProbeBatches | None) -> None:
        if not backbone.head_names:
            raise SelectuneError(f"method linear: model '{backbone.name}' has no new head to train (a causal LM "
                                 f"answers with its own output embedding); pick another method")
        if self.cfg.cached:
            head_plan(backbone)  # refuse an unknown head now (validate and train alike), not after the set-up

    def prepare(self, splits: dict[str, EncodedSplit], batch_size: int,
                device: torch.device) -> dict[str, EncodedSplit]:
        """Cached: each split becomes its stored features, and `model` the head that reads them."""
        if not self.cfg.cached:
            return splits
        assert self.backbone is not None
        plan = head_plan(self.backbone)
        full = self.backbone.model
        features = {name: extract(full, plan, split, batch_size, device) for name, split in splits.items()}
        self.head = HeadModel(full, plan)
        return features

    @property
    def model(self) -> nn.Module:
        return self.head if self.head is not None else super().model

    def describe(self) -> dict[str, Any]:
        return {"cached": True} if self.cfg.cached else {}

    def method_delta(self) -> dict[str, torch.Tensor]:
        return {}
