"""SaRA: fine-tune the pretrained entries that matter least to the pretrained model (docs/methods.md, SaRA;
Hu et al., ICLR 2025, arXiv 2409.06633 — not SoRA, arXiv 2311.11696).

    M = 1{|W0| < threshold},   W = W0 + scatter(M, values)   (only `values` train)

The selection is either a threshold (the count is reported) or an exact budget: the k entries of
smallest |W0| over all target matrices (k = budget − head; ties broken by name, then index), i.e. the
threshold is derived. Options from the reference code:
  - progressive re-selection at step `progressive_step`: M is re-derived on the current weights
    W0 + Δ (same threshold or same k); entries leaving M keep their learned delta frozen, entries
    joining start at 0, and the optimiser is rebuilt for the new set;
  - a nuclear-norm penalty λ_rank · Σ_W ‖scatter(M, values)‖_* keeping each sparse update low-rank
    (dense SVD per matrix per step: costly, off by default).
Trained on the SparseDelta form: optimiser state exists only for the selected values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from selectune.backbone import Backbone
from selectune.delta import sparse
from selectune.delta.wrapping import ALL_LINEARS, find_linears
from selectune.errors import SelectuneError
from selectune.methods.base import Method, MethodConfig, ProbeBatches, register
from selectune.selection import count, mask_hash, select_below, select_k

log = logging.getLogger(__name__)



@dataclass
class SaRAConfig(MethodConfig):
    targets: list[str] = field(default_factory=lambda: list(ALL_LINEARS))  # Linear weights to select from
    threshold: Optional[float] = None  # select |w| < threshold; None: exactly the budget's count
    progressive_step: Optional[int] = None  # re-select on the current weights at this step
    nuclear_weight: float = 0.0  # λ_rank of the nuclear-norm penalty (reference 5e-4); 0: off
    sparse_grad: str = "auto"  # weight-gradient path: auto (dense on CUDA, sddmm elsewhere) | dense | sddmm


@register("sara")
class SaRA(Method):
    Config = SaRAConfig
    uses_budget = True
    quick_test = {"text": ("method.progressive_step=2",),
                  "vision": ("budget.fraction=null", "budget.count=2000", "method.progressive_step=2")}
    cfg: SaRAConfig

    def setup(self, backbone: Backbone, probe: ProbeBatches | None) -> None:
        linears = find_linears(backbone.model, self.cfg.targets, backbone.head_names)
        self.candidates = [f"{name}.weight" for name in sorted(linears)]
        weights = {n: backbone.model.get_parameter(n) for n in self.candidates}
        selection = self._select(weights)
        self.wrappers = sparse.wrap(backbone.model, {n: selection.get(n, torch.zeros(0, dtype=torch.int32))
                                                     for n in self.candidates}, self.cfg.sparse_grad)
        self.hashes = [mask_hash(selection)]
        self.threshold = max(float(weights[n].detach().reshape(-1)[i.long()].abs().max()) for n, i in selection.items())
        log.info("SaRA selected %d entries (mask %s)", count(selection), self.hashes[0])

    def _select(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.cfg.threshold is not None:
            if self.budget is not None:
                raise SelectuneError("SaRA: give method.threshold or a budget, not both")
            selection = select_below(weights, self.cfg.threshold)
            if not count(selection):
                smallest = min(float(w.abs().min()) for w in weights.values())
                raise SelectuneError(f"SaRA threshold {self.cfg.threshold:g} selects nothing (smallest |w| is "
                                     f"{smallest:.3g}); raise method.threshold or use a budget")
            return selection
        if self.budget is None:
            raise SelectuneError("SaRA needs a budget (budget=0_5pct, budget.count=N) or method.threshold")
        assert self.backbone is not None
        head = self.backbone.num_head_parameters
        if self.budget <= head:
            raise SelectuneError(f"budget of {self.budget:,} does not exceed the head's {head:,} parameters")
        return select_k(weights, self.budget - head, largest=False, magnitude=True)

    # ------------------------------------------------------------------ training
    def penalty(self) -> torch.Tensor | None:
        if not self.cfg.nuclear_weight:
            return None
        total = 0.0
        for wrapper in self.wrappers.values():
            idx, values, _, _ = wrapper.parts("weight")
            if idx.numel():
                dense = torch.zeros(wrapper.weight.numel(), device=values.device).index_add(0, idx.long(), values)
                total = total + torch.linalg.matrix_norm(dense.view_as(wrapper.weight), ord="nuc")
        return self.cfg.nuclear_weight * total

    def after_step(self, step: int) -> dict[str, float]:
        if step != self.cfg.progressive_step:
            return {}
        self._reselect()
        return {"sara_reselected": float(count(self.selection())), "sara_trainable": float(self.num_trainable())}

    def _reselect(self) -> None:
        """Re-derive the selection on W0 + Δ; keep left-out deltas frozen (they stay in the task delta)."""
        current = {}
        with torch.no_grad():
            for module_name, wrapper in self.wrappers.items():
                current[f"{module_name}.weight"] = sparse.effective(wrapper.weight, *wrapper.parts("weight"))
        new = self._select(current)
        for module_name, wrapper in self.wrappers.items():
            all_idx, all_values = wrapper.entries("weight")
            keep = new.get(f"{module_name}.weight", torch.zeros(0, dtype=torch.int32)).to(all_idx.device)
            member = torch.isin(all_idx, keep)
            values = torch.zeros(keep.numel(), device=all_values.device)
            pos = torch.searchsorted(keep, all_idx[member])
            values[pos] = all_values[member]
            wrapper.set_entries("weight", keep, values, all_idx[~member], all_values[~member])
        self.hashes.append(mask_hash(new))
        self.trainable_version += 1
        log.info("SaRA re-selected %d entries (mask %s)", count(new), self.hashes[-1])

    def selection(self) -> dict[str, torch.Tensor]:
        return {f"{m}.weight": w.parts("weight")[0] for m, w in self.wrappers.items() if w.parts("weight")[0].numel()}

    def num_trainable(self) -> int:
        return count(self.selection())

    def describe(self) -> dict[str, Any]:
        return {"selected": self.num_trainable(), "max_selected_abs_weight": self.threshold,
                "threshold": self.cfg.threshold, "mask_hashes": list(self.hashes)}

    # ------------------------------------------------------------------ resume and storing
    def state(self) -> dict[str, Any]:
        parts = {}
        for module_name, wrapper in self.wrappers.items():
            idx, _, f_idx, f_values = wrapper.parts("weight")
            parts[module_name] = {"indices": idx.cpu(), "frozen_indices": f_idx.cpu(), "frozen_values": f_values.cpu()}
        return {"parts": parts, "version": self.trainable_version, "hashes": list(self.hashes)}

    def load_state(self, state: dict[str, Any]) -> None:
        for module_name, saved in state["parts"].items():
            self.wrappers[module_name].set_entries("weight", saved["indices"], torch.zeros(saved["indices"].numel()),
                                                   saved["frozen_indices"], saved["frozen_values"])
        self.trainable_version = state["version"]
        self.hashes = list(state["hashes"])

    def method_delta(self) -> dict[str, torch.Tensor]:
        return sparse.delta_entries(self.wrappers)
