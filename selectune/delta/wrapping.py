"""Swapping modules of a model for wrappers that keep the wrapped module's parameter names."""

from __future__ import annotations

from torch import nn

from selectune.errors import SelectuneError

# The six matrix types of a transformer block, in BERT's names and in transformers 5's ViT names.
ALL_LINEARS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense",
               "q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]


def find_linears(model: nn.Module, targets: list[str], exclude: frozenset[str]) -> dict[str, nn.Linear]:
    """nn.Linear modules whose name ends with one of `targets` (module-name suffixes such as `query` or
    `attention.output.dense`), skipping modules whose weight is in `exclude` (the head)."""
    found = {}
    for name, module in model.named_modules():
        matches = any(name == t or name.endswith("." + t) for t in targets)
        if isinstance(module, nn.Linear) and matches and f"{name}.weight" not in exclude:
            found[name] = module
    if not found:
        raise SelectuneError(f"method.targets={list(targets)} matches no Linear layer of the model")
    return found


def by_module(names: list[str]) -> dict[str, list[str]]:
    """`layer.0.dense.weight`, `layer.0.dense.bias` -> {"layer.0.dense": ["weight", "bias"]}."""
    grouped: dict[str, list[str]] = {}
    for name in names:
        module_name, _, tensor = name.rpartition(".")
        grouped.setdefault(module_name, []).append(tensor)
    return grouped


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
