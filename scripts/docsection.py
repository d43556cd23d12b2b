"""Replace one generated section of a Markdown file (the scripts write docs/, nobody types numbers)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path


def write_section(path: Path, marker: str, body: str) -> None:
    """Put `body` between `<!-- marker -->` and `<!-- /marker -->` in `path` (appended if absent)."""
    block = f"<!-- {marker} -->\n{body.strip()}\n<!-- /{marker} -->"
    doc = path.read_text() if path.exists() else f"# {path.stem.capitalize()}\n"
    pattern = re.compile(rf"<!-- {re.escape(marker)} -->.*?<!-- /{re.escape(marker)} -->", re.S)
    doc = pattern.sub(lambda _: block, doc) if pattern.search(doc) else doc.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)


def publish(body: str, path: Path | None, marker: str) -> None:
    """Print `body`; with a path (a script's `--write`), also put it in that file's `marker` section."""
    print(body)
    if path:
        write_section(path, marker, body)


def head_commit() -> str:
    """The short hash of the checked-out commit: the one a generated table names as read at."""
    return subprocess.run(["git", "log", "-1", "--format=%h"], capture_output=True, text=True).stdout.strip()
