"""The one interface every method implements (docs/design.md, "Flow of one run").

A method is a subclass of `Method` decorated with `@register("<name>")` (the `method.name` configs use),
with a `Config` dataclass (extending MethodConfig) and these class attributes:
    Config                 its settings, checked at config time (MethodConfig.validate, ranges by field name)
    uses_budget            whether it sizes itself from `budget` (else a budget is refused)
    quick_test             the families it runs on and the overrides that make a tiny run finish (tests)
and these hooks, in the order the loop calls them (the two abstract ones are all a method must write):
    setup(backbone, probe)       [abstract] after `attach` froze the base and unfroze the head: insert the
                                 method's wrappers / unfreeze its parameters (probe: batches, for SPT)
    plan(total, per_epoch)       the run's length, before any step: fix and validate schedules
    prepare(splits, ...)         what the loop trains on (the cached linear probe: stored features); the model
                                 the loop then takes is `model`
    param_groups(lr, wd)         what the optimiser sees (ParamGroup's keys: lr, weight_decay, constant,
                                 window, clip), rebuilt whenever `trainable_version` changes
    penalty()                    a term added to the task loss every step (None if none)
    after_step(step)             after every optimiser step, gradients in place: schedules, masks; values to log
    storable                     whether delta() is final now ("best" selection waits for it)
    state() / load_state(s)      what a resumed run needs beyond the trainable tensors
    describe()                   what the method decided (selection counts, ranks), logged and stored
    write_artifacts(run_dir)     plots and files at the end of training
    method_delta()               [abstract] the TaskDelta entries of the method (`<param>::<kind>`), head excluded
and, built on those, `trainable()`, `delta()` (the head's `::set` entries added), `stored_count()` and
`report()` (the budget line).

The task head (the parameters the checkpoint did not have) is trained densely and stored whole by
every method, so the base class handles it. The package imports every module beside this one, so the
training loop, the registry and the registry-wide tests never change for a new method; the forms its
delta stores are the generic ones of selectune.delta.forms.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from selectune.backbone import Backbone
from selectune.budget import BudgetReport
from selectune.delta.taskdelta import TaskDelta
from selectune.errors import SelectuneError
from selectune.tasks.batches import EncodedSplit


@dataclass
class ProbeBatches:
    """Training batches for methods that look at gradients before training (SPT's sensitivity)."""

    batches: Callable[[int], Iterator[dict[str, torch.Tensor]]]  # n -> the first n, fixed seeded order
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # task loss of (logits, labels)
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda grad: grad  # averages a gradient over processes


@dataclass
class ParamGroup:
    """One optimiser parameter group as a method hands it to the loop: AdamW's keys and the loop's own, typed,
    so a misspelt key fails (`ParamGroup.of`) instead of being passed to AdamW and ignored."""

    params: list[torch.Tensor]
    lr: float
    weight_decay: float
    name: str
    constant: bool = False  # no schedule: the learning rate stays as given
    window: Optional[tuple[int, int]] = None  # (start, end): warm-up and decay within these steps; None: the run
    clip: str = "all"  # gradients are clipped to max_grad_norm per family of groups

    def as_dict(self) -> dict[str, Any]:
        """The group as torch.optim takes it (the same tensors, not copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def of(cls, group: Mapping[str, Any], method: str) -> ParamGroup:
        """A group a method returned, checked: an unknown key names the group and the keys there are."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(group) - set(known))
        if unknown:
            raise SelectuneError(f"method {method}: parameter group '{group.get('name')}' has unknown key "
                                 f"'{unknown[0]}' (keys: {', '.join(known)})")
        return cls(**group)


# Ranges of method settings, by field name: a name means one thing in every method's Config that has
# it (r and rank are ranks, lr a learning rate, t_init a step count ...), so one table checks them all.
# A setting left at None (unset) is not checked; a method whose field breaks the convention overrides
# `validate`.
POSITIVE = ("lr", "head_lr", "r", "rank", "alpha", "lora_alpha", "sigma_divisor", "beta", "probe_batches",
            "target_total", "init_ratio",
            "delta_t", "alpha_lr", "phase2_lr", "group_rows", "phase1_epochs", "log_every", "threshold",
            "progressive_step")
NON_NEGATIVE = ("t_init", "t_final", "orth_weight", "nuclear_weight", "l0_weight")
FRACTIONS = ("dropout", "beta1", "beta2")  # in [0, 1)
SHARES = ("phase1_share",)  # in (0, 1)


@dataclass
class MethodConfig:
    """Settings every method has; each method's Config extends it."""

    # Settings renamed so that a name means one thing in every method: old name -> new name. A stored config
    # (a run's config.yaml, a delta's metadata) or an override with the old name reads as the new one.
    renamed: ClassVar[dict[str, str]] = {}

    name: str
    lr: Optional[float] = None  # learning rate of the method's parameters (None: trainer.lr)
    head_lr: Optional[float] = None  # learning rate of the task head (None: the method's lr)

    def validate(self) -> None:
        """Fail at config time, in one line naming the key, on a value no run can use (`method.r=0`,
        a negative learning rate, dropout 1): the dataclass types cannot say it, and found later it is a
        traceback deep in the model or a run that trains nothing."""
        rules = [(POSITIVE, lambda v: v > 0, "must be positive"),
                 (NON_NEGATIVE, lambda v: v >= 0, "must not be negative"),
                 (FRACTIONS, lambda v: 0 <= v < 1, "must be in [0, 1)"),
                 (SHARES, lambda v: 0 < v < 1, "must be in (0, 1)")]
        for names, holds, rule in rules:
            for key in names:
                value = getattr(self, key, None)
                if value is not None and not holds(value):
                    raise SelectuneError(f"method.{key}={value}: {rule} (method {self.name})")


# method.name -> the class that implements it; filled by @register as selectune.methods imports its modules
METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a Method subclass the implementation of `method=<name>`."""

    def add(cls: type[Method]) -> type[Method]:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method '{name}' is registered twice ({METHODS[name].__name__}, {cls.__name__})")
        METHODS[name] = cls
        return cls

    return add


class Method(ABC):
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    uses_budget: ClassVar[bool] = False  # False: the method sizes itself and rejects a budget
    # What the registry-wide tests need to run this method, so a new method adds no line to a shared test:
    # the families it runs on ("text": glue/<task>_<name> on tiny_random; "vision": vtab/dtd10_<name> on
    # dinov2_micro_random), each with the overrides that let it finish a run of 3-8 steps on that tiny model
    # (its presets' schedules and budgets are the real backbones'). A family named here needs the method's
    # preset of that family (preset/glue/<name>.yaml, preset/vtab_dinov2/<name>.yaml), and only those.
    quick_test: ClassVar[dict[str, tuple[str, ...]]] = {"text": (), "vision": ()}

    def __init__(self, cfg: MethodConfig, budget: Optional[int]) -> None:
        self.cfg = cfg
        self.budget = budget
        self.backbone: Backbone | None = None
        # Bumped whenever the set of trainable tensors changes after attach (e.g. SaRA's progressive
        # re-selection); the loop then rebuilds its optimiser over `param_groups`.
        self.trainable_version = 0

    # ------------------------------------------------------------------ set-up
    def attach(self, backbone: Backbone, probe: ProbeBatches | None = None) -> None:
        """Freeze everything, unfreeze the head, then let the method add what it trains."""
        self.backbone = backbone
        for name, param in backbone.model.named_parameters():
            param.requires_grad_(name in backbone.head_names)
        self.setup(backbone, probe)

    @abstractmethod
    def setup(self, backbone: Backbone, probe: ProbeBatches | None) -> None:
        """Insert delta forms / unfreeze the method's parameters (the head is already trainable)."""

    # ------------------------------------------------------------------ training
    def prepare(self, splits: dict[str, EncodedSplit], batch_size: int,
                device: torch.device) -> dict[str, EncodedSplit]:
        """Called once by the loop before it takes `model`: the splits it will train and evaluate on. A method
        may replace them with what it trains on instead (the cached linear probe: the frozen backbone's
        features, one fp32 eval-mode pass at `batch_size`), and `model` with the module that reads them, whose
        parameter names are the full model's. The default: the splits as encoded."""
        return splits

    def plan(self, total_steps: int, steps_per_epoch: int) -> None:  # noqa: B027 (optional hook)
        """Called by the loop before the first step with the run's length: methods with a schedule
        (phases, rank budgets) fix and validate it here, failing before any training."""

    @property
    def model(self) -> nn.Module:
        assert self.backbone is not None, "attach() first"
        return self.backbone.model

    def trainable(self) -> dict[str, nn.Parameter]:
        """Every parameter with a gradient, by name (what a resumable checkpoint saves)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Method and head parameters, each split into decayed (matrices) and not (biases, norms): ParamGroup's
        keys (besides AdamW's, `constant`, `window` and `clip`), as dicts torch.optim takes; the loop reads
        them back through `ParamGroup.of`, so a key a method misspells fails there."""
        assert self.backbone is not None
        method_lr = self.cfg.lr if self.cfg.lr is not None else lr
        head_lr = self.cfg.head_lr if self.cfg.head_lr is not None else method_lr
        groups = []
        for is_head, group_lr in ((False, method_lr), (True, head_lr)):
            params = [(n, p) for n, p in self.trainable().items() if (n in self.backbone.head_names) == is_head]
            for decay in (True, False):
                chosen = [p for n, p in params if (p.ndim >= 2) == decay]
                if chosen:
                    name = f"{'head' if is_head else self.cfg.name}{'' if decay else '/no_decay'}"
                    groups.append(ParamGroup(chosen, group_lr, weight_decay if decay else 0.0, name).as_dict())
        return groups

    def penalty(self) -> torch.Tensor | None:
        return None

    def after_step(self, step: int) -> dict[str, Any]:
        """Called after every optimiser step, gradients still in place; returns values to log."""
        return {}

    def write_artifacts(self, run_dir: Path) -> None:  # noqa: B027 (optional hook)
        """Called once at the end of training: plots and files a method wants in the run directory."""

    def describe(self) -> dict[str, Any]:
        """What the method decided (selection counts, mask hashes, ranks): logged and stored with results."""
        return {}

    def state(self) -> dict[str, Any]:
        """Method state beyond the trainable tensors that a resumed run needs (masks, importance...)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:  # noqa: B027 (optional hook: most methods have no state)
        """Restore what `state()` returned (called before the trainable tensors are restored)."""

    # ------------------------------------------------------------------ storing
    @abstractmethod
    def method_delta(self) -> dict[str, torch.Tensor]:
        """The method's own TaskDelta entries (`<param>::<kind>`), the head excluded."""

    def delta(self) -> dict[str, torch.Tensor]:
        assert self.backbone is not None
        params = dict(self.model.named_parameters())
        head = {f"{n}::set": params[n].detach().clone() for n in sorted(self.backbone.head_names)}
        return {**head, **{k: v.detach().clone() for k, v in self.method_delta().items()}}

    @property
    def storable(self) -> bool:
        """Whether delta() is the final form now (diff pruning's phase 1 is not: it projects later; nor is AdaLoRA
        before its final mask: more than b(T) triplets are live); "best" selection only considers evaluations
        made while this is true."""
        return True

    def stored_count(self) -> int:
        """Numbers the TaskDelta stores (what it will store, for a method that is not storable yet)."""
        return TaskDelta(self.delta()).stored

    def report(self) -> BudgetReport:
        assert self.backbone is not None
        head = self.backbone.num_head_parameters
        return BudgetReport(backbone=self.backbone.num_base_parameters, head=head,
                            trainable=sum(p.numel() for p in self.trainable().values()),
                            stored=self.stored_count(), asked=self.budget)
