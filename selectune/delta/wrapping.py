"""Swapping modules of a model for wrappers that keep the wrapped module's parameter names."""

from __future__ import annotations

from torch import nn


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
