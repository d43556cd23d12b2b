"""The shipped config folder and the options of its groups: what config.py composes from and recipes.py
names recipes after, kept below both so neither imports the other for it."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

CONF_PACKAGE = "selectune.conf"


def conf_dir() -> Path:
    """The folder holding the primary configs and the config groups (recipes live in `recipe/`)."""
    return Path(str(importlib.resources.files(CONF_PACKAGE)))


def group_options(group: str, folder: Path | None = None) -> list[str]:
    """Every option of a config group, nested names included (`task` -> `glue/mrpc`, ...): the shipped ones,
    or those under `folder` (a user's config folder on the searchpath)."""
    root = (conf_dir() if folder is None else folder) / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))
