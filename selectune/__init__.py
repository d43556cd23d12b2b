"""selectune: selective parameter-efficient fine-tuning with tiny per-task deltas.

The Python API (imported on first use, so the CLI starts without torch):
    selectune.load_delta(path) -> Delta      delta.apply(model) / delta.remove(model)
    selectune.TaskSwitcher(model, {"mrpc": path, ...}).switch("mrpc")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Delta", "SelectuneError", "TaskSwitcher", "__version__", "load_delta"]

_API = {"Delta": "selectune.api", "TaskSwitcher": "selectune.api", "load_delta": "selectune.api",
        "SelectuneError": "selectune.errors"}


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'selectune' has no attribute '{name}'")
