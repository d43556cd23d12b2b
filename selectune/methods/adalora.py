"""AdaLoRA (Zhang et al., ICLR 2023), docs/methods.md, AdaLoRA, with the rank schedule owned by the loop.

ΔW = P diag(λ) Q on every target matrix (SVDLinear), loss = task + γ Σ_k R_k (orthogonality).
R comes in two forms: the paper's Σ_k (‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F) (`orth_form=paper`) and the
official code's and peft's mean of the unsquared norms (`reference`, the default): the paper's form is
large at the start, fills Adam's second moments for P and Q, and then P and Q barely move (measured:
docs/results.md, "Why the diff-pruning and AdaLoRA defaults are what they are").
After every optimiser step (gradients still in place):
    I = |w · g|,  Ī ← β1 Ī + (1−β1) I,  U = |I − Ī|,  Ū ← β2 Ū + (1−β2) U,  s = Ī · Ū
    triplet score S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)
Budget b(t) (kept triplets in total): b(0) before t_init; cubic decay to b(T) until T − t_final; b(T)
after. Every ΔT steps in the decay phase the λ of triplets outside the top-b(t) are zeroed (P, Q keep
training, so a triplet can return); at T − t_final the final pattern is fixed and re-applied every
step. The schedule is validated before training (plan), logged every step (metrics.jsonl: budget,
kept triplets, kept rank per matrix), and drawn at the end (adalora_budget.png, adalora_ranks.png).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from selectune.backbone import Backbone
from selectune.delta.svd import SVDLinear, orthogonality_terms
from selectune.delta.wrapping import ALL_LINEARS, find_linears, replace_module
from selectune.errors import SelectuneError
from selectune.methods.base import Method, MethodConfig, ProbeBatches, register
from selectune.selection import select_k
from selectune.sensitivity import TYPE_ORDER, layer_index, module_type


@dataclass
class AdaLoRAConfig(MethodConfig):
    targets: list[str] = field(default_factory=lambda: list(ALL_LINEARS))
    target_total: Optional[int] = None  # b(T), kept triplets in total; None: derived from the budget count
    init_ratio: float = 1.5  # b(0) = init_ratio · b(T) (rounded up to whole ranks per matrix)
    lora_alpha: float = 32.0  # scale = lora_alpha / initial rank
    t_init: float = 0.1  # steps at b(0) before pruning starts (a value < 1 is a fraction of the run)
    t_final: float = 0.2  # final steps at b(T) with the pattern fixed (a value < 1 is a fraction)
    delta_t: int = 10  # ΔT: steps between maskings in the decay phase
    beta1: float = 0.85
    beta2: float = 0.85
    orth_weight: float = 0.1  # γ (paper: 0.1; 0.3 for RTE and STS-B)
    orth_form: str = "reference"  # reference: mean of unsquared norms (official code, peft); paper: Σ_k squared
    trim: bool = False  # store only the kept triplets (physically trimmed delta)


def budget_at(t: int, b0: int, bT: int, t_init: int, t_final: int, total: int) -> int:
    """b(t) of docs/methods.md, AdaLoRA (numerator t − t_init, as the paper and the reference code)."""
    if t < t_init:
        return b0
    if t >= total - t_final:
        return bT
    progress = 1 - (t - t_init) / (total - t_init - t_final)
    return int(bT + (b0 - bT) * progress**3)


@register("adalora")
class AdaLoRA(Method):
    Config = AdaLoRAConfig
    uses_budget = True
    quick_test = {family: ("method.target_total=8", "method.t_init=1", "method.t_final=1", "method.delta_t=1")
                  for family in ("text", "vision")}
    cfg: AdaLoRAConfig

    def setup(self, backbone: Backbone, probe: ProbeBatches | None) -> None:
        if self.cfg.orth_form not in ("paper", "reference"):
            raise SelectuneError(f"method.orth_form='{self.cfg.orth_form}': use paper or reference")
        linears = find_linears(backbone.model, self.cfg.targets, backbone.head_names)
        head = backbone.num_head_parameters
        per_triplet = sum(m.in_features + m.out_features + 1 for m in linears.values()) / len(linears)
        self.per_triplet = per_triplet
        if self.cfg.target_total is not None:
            self.bT = self.cfg.target_total
        elif self.budget is not None:
            self.bT = int((self.budget - head) // per_triplet)
        else:
            raise SelectuneError("AdaLoRA needs method.target_total (b(T)) or a budget (budget.count=N)")
        if self.bT < 1:
            raise SelectuneError(f"AdaLoRA: a final budget of {self.bT} triplets is not reachable; raise the budget")
        self.r0 = max(1, math.ceil(self.cfg.init_ratio * self.bT / len(linears)))
        self.b0 = self.r0 * len(linears)
        if self.bT > self.b0:
            raise SelectuneError(f"AdaLoRA: b(T)={self.bT} exceeds b(0)={self.b0}; raise method.init_ratio")
        self.modules: dict[str, SVDLinear] = {}
        for name, linear in sorted(linears.items()):
            self.modules[name] = SVDLinear(linear, self.r0, self.cfg.lora_alpha)
            replace_module(backbone.model, name, self.modules[name])
        self.ema: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}
        self.fixed: dict[str, torch.Tensor] | None = None
        self._device_keep: list[torch.Tensor] | None = None
        self._set_keep({n: torch.ones(self.r0, dtype=torch.bool) for n in self.modules})  # the last mask applied
        self.history: list[tuple[int, int, int]] = []  # (step, b(t), kept triplets)

    def plan(self, total_steps: int, steps_per_epoch: int) -> None:
        def steps(value: float) -> int:
            return int(round(value * total_steps)) if 0 < value < 1 else int(value)

        self.total, self.t_init, self.t_final = total_steps, steps(self.cfg.t_init), steps(self.cfg.t_final)
        decay = total_steps - self.t_final - self.t_init
        if decay <= 0:
            raise SelectuneError(f"AdaLoRA schedule: t_init ({self.t_init}) + t_final ({self.t_final}) must be less "
                                 f"than the run's {total_steps} steps")
        if self.cfg.delta_t <= 0 or not any(t % self.cfg.delta_t == 0 for t in range(max(1, self.t_init),
                                                                                    total_steps - self.t_final)):
            raise SelectuneError(f"AdaLoRA schedule: no pruning step between t_init={self.t_init} and "
                                 f"T - t_final={total_steps - self.t_final} with delta_t={self.cfg.delta_t}; "
                                 f"lower method.delta_t or t_init/t_final")

    # ------------------------------------------------------------------ training
    def penalty(self) -> torch.Tensor | None:
        if not self.cfg.orth_weight:
            return None
        squared = self.cfg.orth_form == "paper"
        total = orthogonality_terms(list(self.modules.values()), squared)  # batched per shape: few kernels
        return self.cfg.orth_weight * (total if squared else total / (2 * len(self.modules)))

    @torch.no_grad()
    def _update_importance(self) -> None:
        """The EMA update of the module docstring for every P, λ, Q at once: one multi-tensor kernel per
        elementwise operation (torch._foreach_*) instead of ~7 small kernels per tensor — the same
        arithmetic in the same order, so the same numbers."""
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        keys, params, grads = [], [], []
        for name, module in self.modules.items():
            for kind in ("lora_P", "lora_E", "lora_Q"):
                param = getattr(module, kind)
                if param.grad is not None:
                    keys.append(f"{name}.{kind}")
                    params.append(param)
                    grads.append(param.grad)
        if not keys:
            return
        for key, param in zip(keys, params, strict=True):
            if key not in self.ema:
                self.ema[key], self.unc[key] = torch.zeros_like(param), torch.zeros_like(param)
        ema, unc = [self.ema[k] for k in keys], [self.unc[k] for k in keys]
        importance = torch._foreach_mul(params, grads)
        torch._foreach_abs_(importance)
        torch._foreach_mul_(ema, b1)
        torch._foreach_add_(ema, importance, alpha=1 - b1)
        deviation = torch._foreach_sub(importance, ema)
        torch._foreach_abs_(deviation)
        torch._foreach_mul_(unc, b2)
        torch._foreach_add_(unc, deviation, alpha=1 - b2)

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        scores = {}
        for name in self.modules:
            keys = {kind: f"{name}.{kind}" for kind in ("lora_P", "lora_E", "lora_Q")}
            s = {kind: self.ema[key] * self.unc[key] for kind, key in keys.items() if key in self.ema}
            if len(s) < 3:
                return {}
            scores[name] = s["lora_E"] + s["lora_P"].mean(0) + s["lora_Q"].mean(1)
        return scores

    @torch.no_grad()
    def _mask(self, keep: dict[str, torch.Tensor]) -> None:
        """Zero the λ of every triplet outside `keep` (host bools per matrix). Applied to all λ at once as
        λ·m + 0 with m the 0/1 mask on the device (built when the mask changes; the final pattern is
        re-applied every step from the same device copy): no boolean indexing, so no host sync, and
        +0.0 where the pruned λ were, exactly as a masked assignment gives."""
        if keep is not self.keep:
            self._set_keep(keep)
        lambdas = [module.lora_E for module in self.modules.values()]
        if self._device_keep is None or self._device_keep[0].device != lambdas[0].device:
            self._device_keep = [self.keep[n].to(device=e.device, dtype=e.dtype) for n, e in zip(self.modules, lambdas,
                                                                                                  strict=True)]
        torch._foreach_mul_(lambdas, self._device_keep)
        torch._foreach_add_(lambdas, 0.0)

    def _set_keep(self, keep: dict[str, torch.Tensor]) -> None:
        """Record the mask applied (host bools) and its per-matrix ranks; its device copy is rebuilt."""
        self.keep = keep
        self._ranks = {name: int(keep[name].sum()) for name in self.modules}
        self._device_keep = None

    def _top(self, budget: int) -> dict[str, torch.Tensor]:
        scores = self.triplet_scores()
        if not scores:
            return {n: torch.ones(self.r0, dtype=torch.bool) for n in self.modules}
        chosen = select_k(scores, budget, largest=True)
        out = {}
        for name in self.modules:
            keep = torch.zeros(self.r0, dtype=torch.bool)
            if name in chosen:
                keep[chosen[name].long()] = True
            out[name] = keep
        return out

    def after_step(self, step: int) -> dict[str, Any]:
        b = budget_at(step, self.b0, self.bT, self.t_init, self.t_final, self.total)
        if step < self.total - self.t_final:
            self._update_importance()
            if step >= self.t_init and step % self.cfg.delta_t == 0:
                self._mask(self._top(b))
        else:
            if self.fixed is None:
                self.fixed = self._top(self.bT)
            self._mask(self.fixed)
        ranks = self.ranks()
        kept = sum(ranks.values())
        self.history.append((step, b, kept))
        return {"adalora_budget": b, "adalora_kept": kept, "kept_rank": ranks}

    def ranks(self) -> dict[str, int]:
        """Kept triplets per matrix under the last mask (between maskings pruned λ may regrow); counted when
        the mask is set, so a step reads nothing back."""
        return dict(self._ranks)

    # ------------------------------------------------------------------ resume, storing, plots
    def state(self) -> dict[str, Any]:
        return {"ema": {k: v.cpu() for k, v in self.ema.items()}, "unc": {k: v.cpu() for k, v in self.unc.items()},
                "fixed": None if self.fixed is None else dict(self.fixed), "keep": dict(self.keep),
                "history": [list(h) for h in self.history]}

    def load_state(self, state: dict[str, Any]) -> None:
        device = next(iter(self.modules.values())).lora_E.device
        self.ema = {k: v.to(device) for k, v in state["ema"].items()}
        self.unc = {k: v.to(device) for k, v in state["unc"].items()}
        self.fixed = state["fixed"]
        self._set_keep(state["keep"])
        self.history = [tuple(h) for h in state["history"]]

    def describe(self) -> dict[str, Any]:
        """`final_kept_params`: what the kept triplets hold (P column + λ + Q row each, head not counted) —
        the count a trimmed delta stores and a LoRA baseline "at the same final count" must match."""
        final = self.ranks() if self.fixed is not None else None
        kept = None if final is None else sum(r * (self.modules[n].in_features + self.modules[n].out_features + 1)
                                              for n, r in final.items())
        return {"b0": self.b0, "bT": self.bT, "initial_rank": self.r0, "matrices": len(self.modules),
                "final_rank_pattern": final, "final_kept_params": kept, "trimmed": self.cfg.trim}

    @property
    def storable(self) -> bool:
        """Only from the final mask on (the last t_final steps): before it more than b(T) triplets are live (b(0)
        in the warm-up, b(t) while it decays), so a delta stored then is over the budget the run asked for (RTE at
        LoRA's count: 108 triplets, 273k values, at epoch 1 against 222,338 asked). `select=best` and a sweep's
        pruner read only these evaluations; the paper reports the model at the end of its schedule."""
        return self.fixed is not None

    def stored_count(self) -> int:
        """A trimmed delta stores the triplets with λ ≠ 0, so before the final mask it reads nothing like the run's
        answer (at step 0 every λ is 0: the head alone). Until then the count is b(T) triplets of the mean size,
        what the final mask keeps on average (which matrices keep them is learned, so it lands near, not on, it);
        from the final mask on, the delta's own count."""
        if self.cfg.trim and not self.storable:
            assert self.backbone is not None
            return self.backbone.num_head_parameters + round(self.bT * self.per_triplet)
        return super().stored_count()

    def method_delta(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, module in self.modules.items():
            keep = (module.lora_E != 0) if self.cfg.trim else None
            out.update(module.delta_entries(f"{name}.weight", keep))
        return out

    def write_artifacts(self, run_dir: Path) -> None:
        from selectune.plots import curves, grid_heatmap

        steps = list(range(self.total + 1))
        formula = [budget_at(t, self.b0, self.bT, self.t_init, self.t_final, self.total) for t in steps]
        curves({"b(t) (schedule)": (steps, formula),
                "kept triplets": ([h[0] for h in self.history], [h[2] for h in self.history])},
               run_dir / "adalora_budget.png", f"AdaLoRA budget: b(0)={self.b0} → b(T)={self.bT}", "step", "triplets")
        ranks = self.ranks()
        layers = 1 + max((layer_index(n + ".") or 0) for n in ranks)
        grid = [[0.0] * len(TYPE_ORDER) for _ in range(layers)]
        for name, r in ranks.items():
            layer, kind = layer_index(name + "."), module_type(name + ".")
            if layer is not None and kind is not None:
                grid[layer][TYPE_ORDER.index(kind)] = float(r)
        grid_heatmap(grid, TYPE_ORDER, run_dir / "adalora_ranks.png", "AdaLoRA final rank per matrix", "rank",
                     fmt="{:.0f}")
        (run_dir / "adalora_ranks.json").write_text(json.dumps(ranks, indent=1) + "\n")
