"""Pretrained weights that do not ship as a transformers folder and are converted once on first use, and
what loading any model needs (below backbone.py, which builds on this package)."""

from __future__ import annotations


def quiet_transformers() -> None:
    """transformers 5 prints a load report and progress bars on every load; keep the terminal for us."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
