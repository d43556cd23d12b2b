"""A composed config checked section by section against its owners' schemas: what every command (train,
validate, probe) and export start from. Below the commands layer, so export reads a stored run's config
without importing the commands."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from selectune.backbone import ModelConfig
from selectune.budget import BudgetConfig
from selectune.config import typed
from selectune.delta.taskdelta import HALF
from selectune.errors import SelectuneError
from selectune.methods import method_config
from selectune.methods.base import MethodConfig
from selectune.tasks import TaskConfig
from selectune.trainer import TrainerConfig


@dataclass
class RunSpec:
    """A composed config, each section checked against its owner's schema."""

    model: ModelConfig
    task: TaskConfig
    budget: BudgetConfig
    trainer: TrainerConfig
    method: MethodConfig  # the schema of the method the config names

    @classmethod
    def from_config(cls, cfg: DictConfig) -> RunSpec:
        for key in ("model", "task", "method", "budget", "trainer"):
            if key not in cfg or cfg[key] is None:
                raise SelectuneError(f"config has no '{key}' section; pick one ({key}=...) or use a recipe")
        spec = cls(typed(ModelConfig, cfg.model, "model"), typed(TaskConfig, cfg.task, "task"),
                   typed(BudgetConfig, cfg.budget, "budget"), typed(TrainerConfig, cfg.trainer, "trainer"),
                   method_config(cfg.method))
        spec.trainer.validate()
        compact = cfg.get("compact")
        if compact is not None and compact not in HALF:  # checked now, not when the delta is saved at the end
            raise SelectuneError(f"compact={compact}: use {' or '.join(HALF)} (or null for the plain form)")
        if spec.trainer.patience is not None and spec.task.validation is None:  # before any folder is made
            raise SelectuneError("trainer.patience stops on the validation split, and this run has none: add "
                                 "task.validation=0.1 (a share of the training file), so dev is never chosen on")
        for key in ("max_train_examples", "max_eval_examples"):  # 0 would keep one example, not none
            value = getattr(spec.task, key, None)
            if value is not None and value <= 0:
                raise SelectuneError(f"task.{key} must be positive (or null for all), got {value}")
        return spec
