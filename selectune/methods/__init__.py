"""Method registry: `method.name` in a config -> the class that implements it.

Every module in this package is imported here and registers its classes (`@register` in base.py),
so a new method is a new module: nothing here or in the loop names it."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from selectune.config import typed
from selectune.errors import SelectuneError
from selectune.methods.base import METHODS, Method, MethodConfig

for _module in pkgutil.iter_modules(__path__):  # each registers its methods (and delta forms) with @register
    importlib.import_module(f"{__name__}.{_module.name}")


def method_config(node: Any) -> MethodConfig:
    """Check the `method` config section against the schema of the method it names, and its values
    against their ranges (`MethodConfig.validate`)."""
    if isinstance(node, MethodConfig):
        return node
    name = node.get("name") if hasattr(node, "get") else None
    if name not in METHODS:
        raise SelectuneError(f"unknown method '{name}' (known: {', '.join(METHODS)})")
    cfg = typed(METHODS[name].Config, renamed(node, METHODS[name].Config.renamed, name), "method")
    cfg.validate()
    return cfg


def renamed(node: Any, names: dict[str, str], method: str) -> Any:
    """The section with settings under their current names (`MethodConfig.renamed`), so configs stored before
    a rename still read; both names at once is refused."""
    old = [key for key in names if key in node]
    if not old:
        return node
    data = dict(OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node)
    for key in old:
        if names[key] in data:
            raise SelectuneError(f"method.{key} and method.{names[key]} both given: {key} is the old name of "
                                 f"{names[key]} (method {method})")
        data[names[key]] = data.pop(key)
    return data


def build_method(node: Any, budget: Optional[int]) -> Method:
    """Build the method a config section (or an already checked MethodConfig) names."""
    cfg = method_config(node)
    cls = METHODS[cfg.name]
    if budget is not None and not cls.uses_budget:
        raise SelectuneError(f"method '{cfg.name}' sizes itself and takes no budget; drop budget.fraction/count")
    return cls(cfg, budget)
