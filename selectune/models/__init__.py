"""Pretrained weights that do not ship as a transformers folder and are converted once on first use, and
what loading any model needs (below backbone.py, which builds on this package)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from selectune.errors import SelectuneError


def cache_root() -> Path:
    """$XDG_CACHE_HOME/selectune (default ~/.cache/selectune): where converted weights live."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root).expanduser() / "selectune"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(source: Path, expected: str, what: str, fix: str) -> str:
    """`source`'s sha256, or a one-line refusal naming both digests: a converted folder is keyed by the source's
    hash, so a different file (another release, a truncated download) must never be converted under it."""
    found = sha256(source)
    if found != expected:
        raise SelectuneError(f"{what}: {source} has sha256 {found[:8]}…{found[-8:]}, expected "
                             f"{expected[:8]}…{expected[-8:]} ({fix})")
    return found


def publish_once(target: Path, marker: str, record: dict, build: Callable[[Path], None]) -> Path:
    """`build` a folder beside `target`, write its `marker` file last, and rename it into place: a crash mid-way
    leaves no folder with a marker, and a folder without one is never trusted. Another process that finished
    first wins; a stale, unmarked folder in the way is replaced."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        build(tmp)
        (tmp / marker).write_text(json.dumps(record) + "\n")
        try:
            tmp.rename(target)
        except OSError:
            if not (target / marker).is_file():
                shutil.rmtree(target)
                tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def quiet_transformers() -> None:
    """transformers 5 prints a load report and progress bars on every load; keep the terminal for us."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
