"""Swapping modules of a model for wrappers that keep the wrapped module's parameter names."""

from __future__ import annotations

from torch import nn

from selectune import roles
from selectune.errors import SelectuneError

# The matrix types of a transformer block, in BERT's names, transformers 5's ViT names and Llama's.
ALL_LINEARS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense",
               "q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "gate_proj", "up_proj", "down_proj"]


def find_linears(model: nn.Module, targets: list[str], exclude: frozenset[str]) -> dict[str, nn.Linear]:
    """nn.Linear modules named by one of `targets` (roles such as `query` or `down`, mapped per architecture
    by selectune.roles, or module-name suffixes such as `attention.output.dense`), skipping modules whose
    weight is in `exclude` (the head). An output embedding tied to the input embedding is refused: a
    wrapper's delta on it alone would untie the two."""
    arch = roles.architecture(model)
    tied = roles.output_embedding_tied(model)
    found = {}
    for name, module in model.named_modules():
        hit = any(roles.matches(arch, name, t) for t in targets)
        if isinstance(module, nn.Linear) and hit and f"{name}.weight" not in exclude:
            if name == tied:
                raise SelectuneError(f"method.targets={list(targets)} names '{name}', the output embedding, "
                                     f"which shares its weight with the input embedding (tied): a delta on it "
                                     f"alone would untie them; leave it out (full, diffpruning and SPT train "
                                     f"the shared tensor once)")
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
