"""One labelled example, whatever the source."""

from __future__ import annotations

from typing import NamedTuple


class Example(NamedTuple):
    texts: tuple[str, ...]  # one sentence, or a pair
    label: int | float  # class id, or a score for regression (STS-B)
