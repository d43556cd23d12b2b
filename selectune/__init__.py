"""selectune: selective parameter-efficient fine-tuning with tiny per-task deltas."""

__version__ = "0.1.0"
