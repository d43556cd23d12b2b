"""TensorBoard event files beside metrics.jsonl (`trainer.tensorboard=true`, extra `selectune[tensorboard]`).

The trainer hands every metrics.jsonl record to the sink as it writes it, so the curves in TensorBoard
are exactly the logged ones: each numeric leaf becomes a scalar named by its path in the record
(`loss`, `lr`, `eval/dev/f1`, `expected_density`, `adalora_budget`, `kept_rank/<matrix>`) at the
record's step. Without the tensorboard package nothing changes but one line saying so. On resume the
events a killed run wrote after its last checkpoint are purged, as its metrics.jsonl lines are.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

INSTALL = "pip install 'selectune[tensorboard]'"


class TensorBoardSink:
    """Writes records as scalars; the event file is opened on the first record (a run that fails
    before logging leaves none)."""

    def __init__(self, log_dir: Path, writer_class: Any) -> None:
        self.log_dir, self.writer_class = log_dir, writer_class
        self.writer: Any = None
        self.purge_step: int | None = None

    def resume_at(self, step: int) -> None:
        """Events after `step` belong to a killed run: purge them when the writer opens."""
        self.purge_step = step + 1

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            self.writer = self.writer_class(log_dir=str(self.log_dir), purge_step=self.purge_step)
        step = int(record["step"])
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # records come every log_every steps: each is on disk once written

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def scalars(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) for every numeric leaf of a record but its step; None and text are left out."""
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from scalars(value, tag + "/")
        elif isinstance(value, (int, float)) and tag != "step":
            yield tag, float(value)


def open_sink(run_dir: Path, enabled: bool) -> TensorBoardSink | None:
    """A sink writing into the run directory, or None when not asked for or tensorboard is missing."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print(f"trainer.tensorboard=true but the tensorboard package is not installed ({INSTALL}): "
              f"curves go to metrics.jsonl only", file=sys.stderr)
        return None
    return TensorBoardSink(run_dir, SummaryWriter)
