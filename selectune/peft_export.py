"""`selectune export ... format=peft`: a LoRA or AdaLoRA delta as a peft adapter folder.

The folder is written by peft itself (`get_peft_model` on the base, factors copied in,
`save_pretrained`), so `PeftModel.from_pretrained(base, folder)` loads it with no selectune installed:
    LoRA     lora_A = A, lora_B = B, lora_alpha = scale · r       (peft: ΔW = B A · lora_alpha / r)
    AdaLoRA  lora_A = Q, lora_E = λ, lora_B = P, lora_alpha = scale · R, every matrix padded with zero
             triplets to the largest stored rank R (peft: ΔW = P diag(λ) Q · lora_alpha / (R + 1e-5), so
             the update is scaled by R / (R + 1e-5), a relative 1e-5 / R)
and the task head goes in `modules_to_save` (peft stores the classifier whole and swaps it in on load;
the base's own head, whatever its init, is replaced). Anything else a delta can hold — sparse entries,
dense base tensors, Adapters — has no peft LoRA form: those deltas are refused here and keep the
merged export (format=merged, the default).
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from selectune import runfs
from selectune.errors import SelectuneError

PEFT_FORMS = {"lora_A": "LoRA", "svd_P": "AdaLoRA"}


def peft_kind(delta: Any, head_names: frozenset[str] | None = None) -> str:
    """'lora_A' or 'svd_P': the one factored form the delta holds besides its head; refuse anything else.
    Without `head_names` (before the base is built) dense `set` entries are not judged yet."""
    groups = delta.by_parameter()
    factored = {marker for parts in groups.values() for marker in PEFT_FORMS if marker in parts}
    others = sorted({kind for name, parts in groups.items() for kind in parts
                     if kind.split("_")[0] not in ("lora", "svd")
                     and not (kind == "set" and (head_names is None or name in head_names))})
    method = delta.meta.get("method", "this")
    if len(factored) != 1 or others:
        held = ", ".join(others) if others else "no LoRA factors" if not factored else "LoRA and SVD factors"
        raise SelectuneError(f"format=peft holds LoRA and AdaLoRA deltas only; the {method} delta stores {held}, "
                             f"which peft's LoRA cannot hold: export it merged (format=merged, the default)")
    return factored.pop()


def is_causal_lm(model: torch.nn.Module) -> bool:
    """A decoder with its LM head (causal-LM tasks): peft's CAUSAL_LM task type, no head to save."""
    return type(model).__name__.endswith("ForCausalLM")


def export_peft(delta: Any, backbone: Any, target: Path, dtype: torch.dtype) -> dict[str, Any]:
    """Write the adapter folder and say how to load it; returns the export report."""
    held = write_peft(delta, backbone, target, dtype)
    num_labels = backbone.model.config.num_labels
    if is_causal_lm(backbone.model):  # no new head: the adapter alone, on the base's own LM head
        print(f"exported {delta.meta['method']} delta on {backbone.name} to {target} as a peft {held['peft_type']} "
              f"adapter ({held['modules']} matrices, r={held['r']}): load it with "
              f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), '{target}')")
    else:
        print(f"exported {delta.meta['method']} delta on {backbone.name} to {target} as a peft {held['peft_type']} "
              f"adapter ({held['modules']} matrices, r={held['r']}, head in modules_to_save): load it with "
              f"PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, "
              f"num_labels={num_labels}), '{target}')")
    return {"out": str(target), "format": "peft", "dtype": str(dtype).removeprefix("torch."),
            "base_model": backbone.name, "method": delta.meta["method"], **held}


def write_peft(delta: Any, backbone: Any, target: Path, dtype: torch.dtype) -> dict[str, Any]:
    """Write the adapter folder (a temporary folder renamed into place); returns what it holds."""
    from selectune.backbone import save_preprocessor

    marker = peft_kind(delta, backbone.head_names)
    groups = delta.by_parameter()
    model = backbone.model
    head = {name: groups[name]["set"] for name in backbone.head_names if name in groups}
    with torch.no_grad():
        for name, value in head.items():  # into the base first: modules_to_save copies the head as it wraps
            model.get_parameter(name).copy_(value.to(model.get_parameter(name).dtype))
    factors = {name.rpartition(".")[0]: parts for name, parts in groups.items() if marker in parts}
    peft_model, config = _wrap(model, marker, factors, sorted({n.rpartition(".")[0] for n in head}),
                               backbone.tokenizer is not None)
    peft_model.to(dtype)

    def write(folder: Path) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model.save_pretrained(folder)
        save_preprocessor(backbone, folder)

    runfs.publish_dir(target, write)  # atomic; a failure leaves neither the folder nor parents it made
    return {"peft_type": PEFT_FORMS[marker], "modules": len(factors), "r": config.r if marker == "lora_A" else
            config.init_r, "modules_to_save": list(config.modules_to_save or [])}


def _wrap(model: torch.nn.Module, marker: str, factors: dict[str, dict[str, torch.Tensor]], head_modules: list[str],
          text: bool) -> tuple[Any, Any]:
    """get_peft_model with a config reproducing the delta's scales, the factors copied into its modules."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    scales = {float(parts["lora_scale" if marker == "lora_A" else "svd_scale"]) for parts in factors.values()}
    if len(scales) != 1:
        raise SelectuneError(f"format=peft: the delta's factors carry {len(scales)} different scales; peft holds one")
    scale = scales.pop()
    common = {"target_modules": sorted(factors), "lora_dropout": 0.0, "modules_to_save": head_modules,
              "task_type": "CAUSAL_LM" if is_causal_lm(model) else "SEQ_CLS" if text else None}
    if marker == "lora_A":
        ranks = {name: parts["lora_A"].shape[0] for name, parts in factors.items()}
        r = Counter(ranks.values()).most_common(1)[0][0]
        odd = {name: rank for name, rank in ranks.items() if rank != r}
        config = LoraConfig(r=r, lora_alpha=scale * r, rank_pattern=odd,
                            alpha_pattern={name: scale * rank for name, rank in odd.items()}, **common)
    else:
        r = max(1, max(parts["svd_E"].numel() for parts in factors.values()))
        config = AdaLoraConfig(init_r=r, target_r=r, lora_alpha=scale * r, total_step=1, **common)
    with warnings.catch_warnings():  # peft calls a transformers method transformers deprecates: not the user's to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parts in factors.items():
            layer = peft_model.base_model.model.get_submodule(name)
            if marker == "lora_A":
                layer.lora_A["default"].weight.copy_(parts["lora_A"])
                layer.lora_B["default"].weight.copy_(parts["lora_B"])
            else:
                k = parts["svd_E"].numel()  # the rest stays zero: padding triplets change nothing
                q, e, p = layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
                for tensor in (q, e, p):
                    tensor.zero_()
                q[:k].copy_(parts["svd_Q"])
                e[:k, 0].copy_(parts["svd_E"])
                p[:, :k].copy_(parts["svd_P"])
    return peft_model, config
