"""Weight matrices named by their role in a transformer block, mapped per architecture.

A method's targets may name roles instead of one model family's module names:

    query key value output     the attention projections (output: the attention's output projection)
    gate up down               the feed-forward: gate (gated MLPs only), up (into the wide layer), down (out of it)

so `method.targets=[query,value]` means BERT's `attention.self.query/value`, ViT's / DINOv2's
`attention.q_proj/v_proj` and Llama's `self_attn.q_proj/v_proj` alike. A target that is not a role is a
module-name suffix, as before (`q_proj`, `attention.output.dense`). The architecture is read from the
model's `config.model_type`; an unknown one has no roles (suffixes still work).

The probe's heat map uses the same table for its columns (layers x roles). And the output embedding of a
causal LM whose weight is tied to the input embedding (SmolLM2, GPT-2, ...) is one tensor under two
names: `output_embedding_tied` lets the module-wrapping methods refuse it rather than untie it.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

ROLES = ("query", "key", "value", "output", "gate", "up", "down")

# architecture -> role -> regex on the module name (searched, anchored at a dot or the name's start)
_BERT = {"query": r"attention\.self\.query", "key": r"attention\.self\.key", "value": r"attention\.self\.value",
         "output": r"attention\.output\.dense", "up": r"intermediate\.dense",
         "down": r"(?<!attention\.)output\.dense"}
_VIT = {"query": r"attention\.(attention\.query|q_proj)", "key": r"attention\.(attention\.key|k_proj)",
        "value": r"attention\.(attention\.value|v_proj)", "output": r"attention\.(output\.dense|o_proj)",
        "up": r"(intermediate\.dense|mlp\.fc1)", "down": r"((?<!attention\.)output\.dense|mlp\.fc2)"}
_LLAMA = {"query": r"self_attn\.q_proj", "key": r"self_attn\.k_proj", "value": r"self_attn\.v_proj",
          "output": r"self_attn\.o_proj", "gate": r"mlp\.gate_proj", "up": r"mlp\.up_proj", "down": r"mlp\.down_proj"}
ARCHITECTURES: dict[str, dict[str, str]] = {"bert": _BERT, "vit": _VIT, "llama": _LLAMA}
# transformers' config.model_type -> the architecture whose module names it uses
MODEL_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "electra": "bert",
               "vit": "vit", "dinov2": "vit", "deit": "vit",
               "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "smollm3": "llama"}
# parameter-name pieces of token / position embeddings (not ranked by SPT unless asked)
EMBEDDING_MARKS = ("embeddings", "embed_tokens", "embed_positions", "wte.", "wpe.")


def architecture(model: nn.Module) -> str | None:
    """The role table that fits `model` (None: an architecture without one)."""
    return config_architecture(getattr(model, "config", None))


def config_architecture(config: Any) -> str | None:
    """The role table that fits a transformers config, before any model is built from it."""
    model_type = getattr(config, "model_type", None)
    return MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None


def role_of(arch: str | None, module_name: str) -> str | None:
    """The role of the module `module_name` (a module's or a parameter's name) in architecture `arch`."""
    for role, pattern in ARCHITECTURES.get(arch or "", {}).items():
        if re.search(rf"(^|\.){pattern}(\.|$)", module_name):
            return role
    return None


def roles_of(arch: str | None) -> list[str]:
    """The roles the architecture has, in ROLES order (BERT and ViT have no gate)."""
    table = ARCHITECTURES.get(arch or "", {})
    return [r for r in ROLES if r in table]


def matches(model_arch: str | None, module_name: str, target: str) -> bool:
    """Whether a target (a role, or a module-name suffix) names `module_name`. A role the architecture
    does not know falls back to being a suffix (BERT's `query` and `value` are both)."""
    if model_arch in ARCHITECTURES and target in ARCHITECTURES[model_arch]:
        return role_of(model_arch, module_name) == target
    return module_name == target or module_name.endswith("." + target)


def is_embedding(name: str) -> bool:
    return any(mark in name for mark in EMBEDDING_MARKS)


def output_embedding_tied(model: nn.Module) -> str | None:
    """The module name of the output embedding when it shares its weight with the input embedding (a
    delta on one is a delta on both: it is stored once, under the input embedding's parameter name)."""
    get_in: Any = getattr(model, "get_input_embeddings", None)
    get_out: Any = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return None
    try:
        inp, out = get_in(), get_out()
    except (AttributeError, NotImplementedError):
        return None
    if inp is None or out is None or getattr(out, "weight", None) is not getattr(inp, "weight", None):
        return None
    return next((name for name, module in model.named_modules() if module is out), None)


def tied_embedding_weight(model: nn.Module) -> str | None:
    """The parameter name of the input embedding's weight when the output embedding shares it (the one
    name the tensor has in `named_parameters`), else None. Wrappers that compute an effective weight per
    pass (sparse / hard-concrete deltas) would give the lookup and the LM head different weights: those
    methods leave it out (full fine-tuning trains the one shared tensor, a delta on both, stored once)."""
    if output_embedding_tied(model) is None:
        return None
    weight = model.get_input_embeddings().weight
    return next((name for name, param in model.named_parameters() if param is weight), None)
