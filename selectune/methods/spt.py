"""SPT: sensitivity-aware parameter-efficient tuning (He et al., ICCV 2023), docs/methods.md, SPT.

1. Sensitivity s = Σ g² over `probe_batches` training batches (fixed order, seeded).
2. Allocation under a budget B of stored numbers (head counted): take the global top-τ entries; a
   matrix with at least σ_opt of them (σ_opt = parameters of its LoRA / Adapter module / `sigma_divisor`) is
   tuned structurally (LoRA rank r, or a bottleneck Adapter of width r); a vector with at least
   dim / `beta` of them is tuned whole; every other selected entry is tuned alone on the SparseDelta
   form. τ is the largest value whose total stays within B (found by bisection over one sorted
   ranking); the run reports the total and its gap to B (the tolerance: the gap is below the cost of
   the next structural switch).
3. Training through the common loop; the allocation is saved with the run (describe / delta meta).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from selectune import roles
from selectune.backbone import Backbone
from selectune.delta import sparse
from selectune.delta.adapter import AdapterLinear
from selectune.delta.lowrank import LowRankLinear
from selectune.delta.wrapping import replace_module
from selectune.errors import SelectuneError
from selectune.methods.base import Method, MethodConfig, ProbeBatches, register
from selectune.selection import mask_hash
from selectune.sensitivity import Ranking, candidates, probe

log = logging.getLogger(__name__)


@dataclass
class SPTConfig(MethodConfig):
    rank: int = 8  # LoRA rank / Adapter width of structurally tuned matrices
    lora_alpha: float = 16.0  # LoRA scale = lora_alpha / rank
    sigma_divisor: float = 10.0  # σ_opt = (parameters of the structured module) / sigma_divisor (the paper's α)
    beta: float = 5.0  # a vector is tuned whole when at least dim / beta of its entries are selected
    probe_batches: int = 16
    include_embeddings: bool = False
    sparse_grad: str = "auto"  # weight-gradient path of the entries tuned alone (see SaRA's option)
    form: str = "lora"  # what tunes a structurally selected matrix: lora | adapter
    renamed: ClassVar[dict[str, str]] = {"alpha": "sigma_divisor"}  # alpha means LoRA's scale elsewhere

    def validate(self) -> None:
        super().validate()
        if self.form not in ("lora", "adapter"):
            raise SelectuneError(f"method.form={self.form}: use lora or adapter (method {self.name})")


@dataclass
class SPTAdapterConfig(SPTConfig):
    form: str = "adapter"


@dataclass
class Allocation:
    tau: int
    structured: list[str]  # matrix names tuned by a LoRA / Adapter
    whole: list[str]  # vector names tuned whole
    entries: dict[str, torch.Tensor]  # name -> sorted int32 indices tuned alone
    stored: int  # numbers stored without the head

    def describe(self) -> dict[str, Any]:
        return {"tau": self.tau, "structured": self.structured, "whole_vectors": self.whole,
                "unstructured_entries": sum(int(i.numel()) for i in self.entries.values()),
                "unstructured_hash": mask_hash(self.entries), "stored_without_head": self.stored}


def allocate(scores: dict[str, torch.Tensor], budget: int, module_cost, alpha: float, beta: float,
             structurable: set[str]) -> Allocation:
    """SPT's allocation (see module docstring); `module_cost(shape)` = parameters of one LoRA/Adapter, `alpha`
    the paper's α (method.sigma_divisor)."""
    ranking = Ranking(scores)
    shapes = {n: scores[n].shape for n in scores}

    def plan(tau: int) -> tuple[int, list[str], list[str]]:
        total, structured, whole = 0, [], []
        for name, c in ranking.counts(tau).items():
            if not c:
                continue
            shape = shapes[name]
            if len(shape) == 2 and name in structurable and c >= module_cost(shape) / alpha:
                structured.append(name)
                total += module_cost(shape)
            elif len(shape) == 1 and c >= shape[0] / beta:
                whole.append(name)
                total += shape[0]
            else:
                total += c
        return total, structured, whole

    if budget < 1:
        raise SelectuneError(f"SPT budget of {budget:,} leaves nothing beyond the head")
    lo, hi = 0, ranking.total  # invariant: plan(lo) fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if plan(mid)[0] <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        raise SelectuneError(f"SPT budget of {budget:,} is too small for a single entry")
    total, structured, whole = plan(lo)
    entries = {n: i for n, i in ranking.top(lo).items() if n not in structured and n not in whole}
    # Top up to the budget with the next-ranked entries that change no tensor's kind (each tensor stays
    # below its structural / whole-vector threshold), so the stored count matches the budget exactly
    # unless no such entry is left.
    counts = ranking.counts(lo)
    caps = torch.zeros(len(ranking.names), dtype=torch.long)
    for i, name in enumerate(ranking.names):
        shape = shapes[name]
        if name in structured or name in whole:
            continue
        if len(shape) == 1:
            limit = math.ceil(shape[0] / beta)
        elif name in structurable:
            limit = math.ceil(module_cost(shape) / alpha)
        else:
            limit = ranking.total
        caps[i] = max(0, limit - 1 - counts[name])
    extra = ranking.next_entries(lo, caps, budget - total)
    for name, idx in extra.items():
        entries[name] = torch.cat([entries.get(name, torch.zeros(0, dtype=torch.int32)), idx]).sort().values
    total += sum(int(i.numel()) for i in extra.values())
    return Allocation(lo, sorted(structured), sorted(whole), entries, total)


@register("spt_lora")
class SPT(Method):
    Config = SPTConfig
    uses_budget = True
    quick_test = {"text": ("budget=none", "budget.count=20000", "method.probe_batches=2"),
                  "vision": ("budget=none", "budget.count=3000", "method.probe_batches=2")}
    cfg: SPTConfig

    def setup(self, backbone: Backbone, probe_batches: ProbeBatches | None) -> None:
        if self.budget is None:
            raise SelectuneError("SPT allocates a budget: give budget.count=N, budget.beyond_head=N or "
                                 "budget.fraction=F")
        if probe_batches is None:
            raise SelectuneError("SPT needs training batches to probe sensitivity")
        self.adapter = self.cfg.form == "adapter"
        model = backbone.model
        tied = roles.tied_embedding_weight(model)  # sparse entries on it would differ between lookup and LM head
        names = [n for n in candidates(model, backbone.head_names, self.cfg.include_embeddings) if n != tied]
        linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        scores = probe(model, names, probe_batches.batches(self.cfg.probe_batches), probe_batches.loss,
                       reduce=probe_batches.reduce)["grad2"]
        head = backbone.num_head_parameters
        rank = self.cfg.rank

        def module_cost(shape: torch.Size) -> int:
            out_f, in_f = shape
            return rank * (in_f + out_f) + ((rank + out_f) if self.adapter else 0)

        self.allocation = allocate(scores, self.budget - head, module_cost, self.cfg.sigma_divisor, self.cfg.beta,
                                   structurable=linear_weights & set(names))
        alloc = self.allocation
        self.structured: dict[str, nn.Module] = {}
        for name in alloc.structured:
            module_name = name.rpartition(".")[0]
            linear = model.get_submodule(module_name)
            wrapper = (AdapterLinear(linear, rank) if self.adapter else
                       LowRankLinear(linear, rank, self.cfg.lora_alpha))
            replace_module(model, module_name, wrapper)
            self.structured[module_name] = wrapper
        for name in alloc.whole:
            model.get_parameter(name).requires_grad_(True)
        self.sparse = sparse.wrap(model, alloc.entries, self.cfg.sparse_grad)
        log.info("SPT allocation: %s", alloc.describe())

    def describe(self) -> dict[str, Any]:
        return {"adapter" if self.adapter else "lora": self.cfg.rank, **self.allocation.describe()}

    def method_delta(self) -> dict[str, torch.Tensor]:
        out = {}
        for module_name, module in self.structured.items():
            out.update(module.delta_entries(f"{module_name}.weight"))
        for name in self.allocation.whole:
            out[f"{name}::set"] = self.model.get_parameter(name)
        out.update(sparse.delta_entries(self.sparse))
        return out


@register("spt_adapter")
class SPTAdapter(SPT):
    """SPT-Adapter (`method=spt_adapter`): SPT whose config defaults to `form: adapter`, so a run stored
    before the field existed still reads as SPT-Adapter."""

    Config = SPTAdapterConfig
