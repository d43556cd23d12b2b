"""One notion of budget for every method: the number of per-task numbers stored.

A budget is asked as a fraction of the backbone (`budget.fraction=0.005`) or a count
(`budget.count=120000`); the head, which every method stores whole, is counted in it (as diff
pruning's 0.5% counts the classifier). Or as a count beyond the head (`budget.beyond_head=73728`):
the run's own head is added to it, so a method sized to another's count matches it whatever the
head holds (a regression task's one output, MNLI's three, the pooler where the model trains it with
the head). Every run reports what it asked, what it trains and what it stores, so two methods are
only compared at the same stored count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from selectune.errors import SelectuneError


@dataclass
class BudgetConfig:
    """The `budget` config group. Both null: the method's own size (LoRA's r, BitFit's biases...)."""

    fraction: Optional[float] = None  # of the backbone's pretrained parameters
    count: Optional[int] = None  # absolute number of stored values
    beyond_head: Optional[int] = None  # stored values besides the run's head (its size is added)

    def resolve(self, num_backbone: int, num_head: int) -> Optional[int]:
        """The asked number of stored values (head included), or None when the method sizes itself."""
        given = [f"budget.{k}" for k in ("fraction", "count", "beyond_head") if getattr(self, k) is not None]
        if len(given) > 1:
            raise SelectuneError(f"budget: {' and '.join(given)} are set together; give one (a preset's budget is "
                                 "replaced whole by e.g. budget=none budget.count=N)")
        if self.beyond_head is not None:
            if self.beyond_head <= 0:
                raise SelectuneError(f"budget.beyond_head={self.beyond_head}: must be positive")
            return self.beyond_head + num_head
        if self.fraction is not None:
            if not 0 < self.fraction <= 1:
                raise SelectuneError(f"budget.fraction={self.fraction}: must be in (0, 1]")
            return max(1, round(self.fraction * num_backbone))
        if self.count is not None:
            if self.count <= 0:
                raise SelectuneError(f"budget.count={self.count}: must be positive")
            return self.count
        return None


@dataclass
class BudgetReport:
    """The budget line every run prints and stores."""

    backbone: int  # pretrained parameters of the base model (head excluded)
    head: int  # parameters of the new task head (trained and stored whole by every method)
    trainable: int  # parameters with a gradient and optimiser state
    stored: int  # numbers in the task delta (values only; sparse indices are overhead, not budget)
    asked: Optional[int] = None  # the budget asked for, if any

    @property
    def stored_percent(self) -> float:
        return 100.0 * self.stored / self.backbone

    def line(self) -> str:
        asked = f"asked {self.asked:,} · " if self.asked is not None else ""
        return (f"budget: {asked}trainable {self.trainable:,} · stored {self.stored:,} "
                f"({self.stored_percent:.3f}% of the {self.backbone:,}-parameter backbone; head {self.head:,})")

    def as_dict(self) -> dict:
        return {**asdict(self), "stored_percent": self.stored_percent}
