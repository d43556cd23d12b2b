"""One labelled example, whatever the source, and what a text task's labels say about its head."""

from __future__ import annotations

from typing import NamedTuple


class Example(NamedTuple):
    texts: tuple[str, ...]  # one sentence, or a pair
    label: int | float  # class id, or a score for regression (STS-B)


class LabelledSpec:
    """The head a text task's spec (GLUE's, a user's file's) implies from its `labels`: None is a regression
    score with one output; otherwise one output per label."""

    labels: tuple[str, ...] | None

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)
