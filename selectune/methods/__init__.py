"""Method registry: `method.name` in a config -> the class that implements it."""

from __future__ import annotations

from typing import Any, Optional

from selectune.config import typed
from selectune.errors import SelectuneError
from selectune.methods.adalora import AdaLoRA
from selectune.methods.base import Method, MethodConfig
from selectune.methods.baselines import BitFit, FullFineTune, LinearProbe
from selectune.methods.diffpruning import DiffPruning
from selectune.methods.lora import LoRA
from selectune.methods.sara import SaRA
from selectune.methods.spt import SPT

METHODS: dict[str, type[Method]] = {
    "full": FullFineTune,
    "bitfit": BitFit,
    "linear": LinearProbe,
    "lora": LoRA,
    "sara": SaRA,
    "udiff": DiffPruning,
    "sdiff": DiffPruning,
    "spt_lora": SPT,
    "spt_adapter": SPT,
    "adalora": AdaLoRA,
}


def method_config(node: Any) -> MethodConfig:
    """Check the `method` config section against the schema of the method it names, and its values
    against their ranges (`MethodConfig.validate`)."""
    if isinstance(node, MethodConfig):
        return node
    name = node.get("name") if hasattr(node, "get") else None
    if name not in METHODS:
        raise SelectuneError(f"unknown method '{name}' (known: {', '.join(METHODS)})")
    cfg = typed(METHODS[name].Config, node, "method")
    cfg.validate()
    return cfg


def build_method(node: Any, budget: Optional[int]) -> Method:
    """Build the method a config section (or an already checked MethodConfig) names."""
    cfg = method_config(node)
    cls = METHODS[cfg.name]
    if budget is not None and not cls.uses_budget:
        raise SelectuneError(f"method '{cfg.name}' sizes itself and takes no budget; drop budget.fraction/count")
    return cls(cfg, budget)
