"""Diff pruning (Guo, Rush, Kim, ACL 2021): U-Diff (`udiff`) and S-Diff (`sdiff`); docs/methods.md, diff pruning.

One run holds both phases of the paper, so the stored delta is sparse from the start:

Phase 1 (L0 training, the first `phase1_epochs`): θ = θ0 + z ⊙ w on the hard-concrete form, loss =
task + λ · E‖δ‖₀; w and α in separate groups (w: method lr, linear schedule; α: `alpha_lr`, constant,
as the reference's never-stepped α schedule), gradients clipped separately. S-Diff adds one gate per
group. Its penalty is by default the released code's Σ_i σ(α_i − c) + Σ_j σ(α^j − c), one penalty
unit per group (`group_penalty=reference`); `group_penalty=paper` is the paper's Σ_j Σ_{i∈g(j)}
σ(α_i − c) σ(α^j − c), whose group gates close early under Adam (the group logit's gradient is the sum
over its whole group). α moves from α_init at Adam's pace, so phase 1's length in steps (batch size)
and λ decide the density it ends at: the recipes use the paper's batch of 8 and set λ per task where
the default does not reach the budget; why, with the measurements: docs/results.md, "Why the diff-pruning
and AdaLoRA defaults are what they are".
Projection (paper §4.3): δ = z_eval ⊙ w, keep the top-k |δ| with k = budget − head (0.5% of the
backbone with the head counted, by default; exact, stable tie-break). When phase 1 ends sparser than
the budget, all nonzero δ are kept
and the rest of k goes to the zero-δ entries with the largest log P(z > 0); the projection record counts them.
Phase 2: only those k entries train, on the SparseDelta form with the mask fixed, at `phase2_lr`
with their own warm-up and decay over the remaining steps; w and α are dropped.
The head trains densely throughout and counts in the budget.
Phase 1 runs as one flat pass per forward (`FlatGates`: one noise draw, one gate Function, one penalty
reduction for every gated tensor) instead of ~15-27 small ops per tensor: the same math (tests compare
both, gradients included), a few kernels per step on a GPU. `compile` (auto | true | false) compiles its
elementwise math with torch.compile; auto = on CUDA with Triton only. It is a method setting, not a
trainer one, because only this method has such math and settings reach a method through its config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from selectune import roles
from selectune.backbone import Backbone
from selectune.delta import sparse
from selectune.delta.hardconcrete import FlatGates, HardConcreteModule
from selectune.delta.wrapping import by_module, replace_module
from selectune.errors import SelectuneError
from selectune.methods.base import Method, MethodConfig, ParamGroup, ProbeBatches, register
from selectune.selection import mask_hash, select_k

log = logging.getLogger(__name__)


@dataclass
class DiffPruningConfig(MethodConfig):
    target_params: Optional[list[str]] = None  # parameter-name suffixes to diff-prune; None: every pretrained tensor
    # `targets` means module-name suffixes in the other methods
    renamed: ClassVar[dict[str, str]] = {"targets": "target_params"}
    l0_weight: float = 1.25e-7  # λ
    alpha_init: float = 5.0
    alpha_lr: float = 0.1
    stretch_left: float = -1.5  # l
    stretch_right: float = 1.5  # r
    group_rows: Optional[int] = None  # S-Diff groups: None = one per tensor; N = blocks of N rows (a head)
    group_penalty: str = "reference"  # S-Diff: Σ_i σ(α_i−c) + Σ_j σ(α^j−c); "paper": Σ_j Σ_i σ(α_i−c)σ(α^j−c)
    phase1_epochs: float = 3.0  # the rest of trainer.epochs is phase 2
    phase1_share: Optional[float] = None  # instead of phase1_epochs: this share of all steps (any schedule length)
    phase2_lr: float = 5.0e-5
    log_every: int = 50  # steps between density statistics in metrics.jsonl (they scan every α)
    compile: str = "auto"  # torch.compile the flat gate math: auto (CUDA with Triton only) | true | false
    structured: bool = False  # S-Diff: one more gate per group (a tensor, or group_rows rows) scales its entries'


    def validate(self) -> None:
        super().validate()
        # hard-concrete gates reach exactly 0 and 1 only from a stretch l < 0 < 1 < r, and P(z > 0) takes log(-l/r)
        if not (self.stretch_left < 0 and self.stretch_right > 1):
            raise SelectuneError(f"method.stretch_left={self.stretch_left}, stretch_right={self.stretch_right}: "
                                 f"the stretch needs left < 0 and right > 1 (method {self.name})")
        if self.group_penalty not in ("reference", "paper"):
            raise SelectuneError(f"method.group_penalty={self.group_penalty}: use reference or paper "
                                 f"(method {self.name})")


@dataclass
class StructuredDiffPruningConfig(DiffPruningConfig):
    structured: bool = True


@register("udiff")
class DiffPruning(Method):
    Config = DiffPruningConfig
    uses_budget = True
    quick_test = {"text": ("method.phase1_share=0.5",),
                  "vision": ("budget.fraction=null", "budget.count=2000", "method.phase1_share=0.5")}
    cfg: DiffPruningConfig

    def setup(self, backbone: Backbone, probe: ProbeBatches | None) -> None:
        if self.budget is None:
            raise SelectuneError(f"{self.cfg.name} projects onto an exact budget: give budget=0_5pct or budget.count")
        self.structured = self.cfg.structured
        if self.cfg.group_penalty not in ("paper", "reference"):
            raise SelectuneError(f"method.group_penalty={self.cfg.group_penalty}: use paper or reference")
        compile_mode = str(self.cfg.compile).lower()
        if compile_mode not in ("auto", "true", "false"):
            raise SelectuneError(f"method.compile={self.cfg.compile}: use auto, true or false")
        tied = roles.tied_embedding_weight(backbone.model)  # one tensor, two uses: a per-pass delta would split it
        wanted = self.cfg.target_params
        names = [n for n in backbone.base_parameters()
                 if (wanted is None or any(n == t or n.endswith("." + t) for t in wanted)) and n != tied]
        if tied is not None:
            log.info("diff pruning leaves out %s: the LM head shares it (tied embeddings)", tied)
        if not names:
            raise SelectuneError(f"method.target_params={self.cfg.target_params} matches no parameter of the model")
        self.names = names
        self.head = backbone.num_head_parameters
        if not 0 < self.budget - self.head <= sum(backbone.model.get_parameter(n).numel() for n in names):
            raise SelectuneError(f"budget of {self.budget:,} must exceed the head ({self.head:,}) and fit the "
                                 f"{len(names)} target tensors")
        self.phase = 1
        self.switch_step: int | None = None
        self.hardconcrete: dict[str, HardConcreteModule] = {}
        for module_name, tensors in by_module(names).items():
            module = HardConcreteModule(backbone.model.get_submodule(module_name), tensors, self.cfg.alpha_init,
                                        self.cfg.stretch_left, self.cfg.stretch_right, self.cfg.group_rows,
                                        self.structured, self.cfg.group_penalty)
            replace_module(backbone.model, module_name, module)
            self.hardconcrete[module_name] = module
        self.flat: FlatGates | None = FlatGates(list(self.hardconcrete.values()), compile_mode)
        self.hooks = [backbone.model.register_forward_pre_hook(self.flat.pre_hook),
                      backbone.model.register_forward_hook(self.flat.post_hook, always_call=True)]
        self.wrappers: dict[str, sparse.SparseDeltaModule] = {}
        self.projection: dict[str, Any] = {}

    def plan(self, total_steps: int, steps_per_epoch: int) -> None:
        self.total_steps = total_steps
        self.switch_step = (round(self.cfg.phase1_share * total_steps) if self.cfg.phase1_share is not None
                            else round(self.cfg.phase1_epochs * steps_per_epoch))
        if not 0 < self.switch_step < total_steps:
            raise SelectuneError(f"{self.cfg.name}: phase 1 ({self.cfg.phase1_epochs} epochs = {self.switch_step} "
                                 f"steps) must end before the run's {total_steps} steps; make trainer.epochs "
                                 f"larger than method.phase1_epochs")

    # ------------------------------------------------------------------ phase 1
    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        groups = super().param_groups(lr, weight_decay)
        if self.phase == 1:  # α: its own constant lr, no decay, clipped on its own (reference)
            for group in groups:
                if group["name"].startswith(self.cfg.name):
                    group["clip"] = "w"
            alphas = [p for n, p in self.model.named_parameters() if n.endswith("alpha") and p.requires_grad]
            alpha_ids = {id(a) for a in alphas}
            for group in groups:
                group["params"] = [p for p in group["params"] if id(p) not in alpha_ids]
            groups = [g for g in groups if g["params"]]
            groups.append(ParamGroup(alphas, self.cfg.alpha_lr, 0.0, f"{self.cfg.name}/alpha", constant=True,
                                     clip="alpha").as_dict())
        else:
            assert self.switch_step is not None
            for group in groups:
                if not group["name"].startswith("head"):
                    group["lr"] = self.cfg.phase2_lr
                    group["window"] = (self.switch_step, self.total_steps)
        return groups

    def penalty(self) -> torch.Tensor | None:
        if self.phase != 1:
            return None
        assert self.flat is not None
        flat = self.flat.take_l0()  # the flat pass's term, from this step's forward
        if flat is None:
            return self.cfg.l0_weight * self.expected_l0()
        rest = [m.expected_l0(n) for m in self.hardconcrete.values() if m not in self.flat.penalized_modules
                for n in m.delta_names]
        return self.cfg.l0_weight * (flat + sum(rest))

    def expected_l0(self) -> torch.Tensor:
        return sum(m.expected_l0(n) for m in self.hardconcrete.values() for n in m.delta_names)

    def after_step(self, step: int) -> dict[str, float]:
        if self.phase == 1 and step == self.switch_step:
            stats = self.statistics()
            self.project()
            return {**stats, **{k: v for k, v in self.projection.items() if isinstance(v, (int, float))}}
        if self.phase == 1 and step % self.cfg.log_every == 0:
            return self.statistics()
        return {}

    @torch.no_grad()
    def statistics(self) -> dict[str, float]:
        """Expected density, nonzero fraction of z (a training sample and eval), groups fully off."""
        total = sum(self.model.get_parameter(n).numel() for n in self.names)
        sampled = evaluated = groups = groups_off = 0
        for module in self.hardconcrete.values():
            for name in module.delta_names:
                sampled += int((module.mask(name, training=True) > 0).sum())
                z = module.mask(name, training=False)
                evaluated += int((z > 0).sum())
                ids = module.group_ids(name)
                if ids is None:
                    groups, groups_off = groups + 1, groups_off + int(not (z > 0).any())
                else:
                    on = torch.zeros(int(ids.max()) + 1, dtype=torch.bool, device=z.device)
                    on.index_fill_(0, ids[(z > 0).reshape(-1)], True)
                    groups, groups_off = groups + on.numel(), groups_off + int((~on).sum())
        return {"expected_density": float(self.expected_l0()) / total, "z_nonzero_sampled": sampled / total,
                "z_nonzero_eval": evaluated / total, "groups_off_fraction": groups_off / groups,
                "phase": 1.0}

    # ------------------------------------------------------------------ projection -> phase 2
    @torch.no_grad()
    def project(self) -> None:
        """Keep the top-k |z ⊙ w| (paper §4.3) and continue on the SparseDelta form with a fixed mask.

        When phase 1 ends sparser than the budget (fewer than k nonzero δ), every nonzero entry is kept and
        the rest of the exact budget goes to the zero-δ entries phase 1 came closest to switching on (the
        largest log P(z > 0)), not to whichever tensor sorts first: a tie-break by position would spend
        the filler on the embedding LayerNorm and the first rows of the position embeddings."""
        modules = {f"{m}.{n}": (module, n) for m, module in self.hardconcrete.items() for n in module.delta_names}
        deltas = {key: module.delta(n, training=False) for key, (module, n) in modules.items()}
        k = self.budget - self.head
        nonzero = sum(int((d != 0).sum()) for d in deltas.values())
        if nonzero >= k:
            scores = {key: d.abs() for key, d in deltas.items()}
        else:  # all nonzero entries (+inf), then the filler by gate probability
            scores = {key: torch.where(d != 0, torch.inf, modules[key][0].log_keep(modules[key][1]))
                      for key, d in deltas.items()}
        selection = select_k(scores, k, largest=True)
        self._to_sparse(selection, {n: deltas[n].reshape(-1)[i.long()] for n, i in selection.items()})
        tensors_touched = len(selection)
        self.projection = {"projected_from_nonzero": nonzero, "kept": k, "mask_hash": mask_hash(selection),
                           "filled_by_gate_probability": max(0, k - nonzero),
                           "tensors_untouched_fraction": 1 - tensors_touched / len(self.names)}
        log.info("%s projection: %d nonzero -> %d kept%s (mask %s)", self.cfg.name, nonzero, k,
                 f", {k - nonzero} of them zero-δ entries by gate probability" if nonzero < k else "",
                 self.projection["mask_hash"])

    def _to_sparse(self, selection: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
        empty = torch.zeros(0, dtype=torch.int32)
        for module_name, module in self.hardconcrete.items():
            wrapper = sparse.SparseDeltaModule(module.wrapped, {n: selection.get(f"{module_name}.{n}", empty)
                                                                for n in module.delta_names})
            for n in module.delta_names:
                key = f"{module_name}.{n}"
                if key in values:
                    wrapper.parts(n)[1].data.copy_(values[key])
            replace_module(self.model, module_name, wrapper)
            self.wrappers[module_name] = wrapper
        for hook in self.hooks:
            hook.remove()
        self.hardconcrete, self.hooks, self.flat = {}, [], None  # frees the flat w and α
        self.phase = 2
        self.trainable_version += 1

    # ------------------------------------------------------------------ resume and storing
    def state(self) -> dict[str, Any]:
        if self.phase == 1:
            return {"phase": 1}
        selection = {f"{m}.{n}": w.parts(n)[0].cpu() for m, w in self.wrappers.items() for n in w.delta_names}
        return {"phase": 2, "selection": selection, "projection": dict(self.projection)}

    def load_state(self, state: dict[str, Any]) -> None:
        if state["phase"] == 2:
            self._to_sparse({n: i for n, i in state["selection"].items() if i.numel()}, {})
            self.projection = state["projection"]

    @property
    def storable(self) -> bool:
        return self.phase == 2

    def stored_count(self) -> int:
        assert self.budget is not None
        return self.budget if self.phase == 1 else super().stored_count()

    def describe(self) -> dict[str, Any]:
        return {"phase": self.phase, "structured": self.structured, **self.projection}

    def method_delta(self) -> dict[str, torch.Tensor]:
        if self.phase == 1:
            raise SelectuneError(f"{self.cfg.name}: the delta is sparse only after the projection at step "
                                 f"{self.switch_step}; evaluate with trainer.select=last or after phase 1")
        return sparse.delta_entries(self.wrappers)


@register("sdiff")
class StructuredDiffPruning(DiffPruning):
    """S-Diff-Pruning (`method=sdiff`): diff pruning whose config defaults to `structured: true`, so a run
    stored before the field existed still reads as S-Diff."""

    Config = StructuredDiffPruningConfig
