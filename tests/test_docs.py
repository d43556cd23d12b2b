"""The README's and docs/api.md's examples run as written: every fenced block marked `<!-- doctest -->` (or
`<!-- doctest: <overrides> -->`, appended to each `selectune train` line so a minutes-long run takes seconds)
is run in order, in one fresh folder per document with the tiny GLUE data and the files the README's custom
text example names. bash blocks run in bash with `selectune` as this Python's `-m selectune`; python blocks run
in one namespace per document, so a later block uses what an earlier one made. Unmarked blocks (installs,
torchrun, sweeps, hour-long reproductions) are not run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

MARK = re.compile(r"<!-- doctest(?::\s*(?P<overrides>[^>]*?))?\s*-->\s*\n```(?P<lang>\w+)\n(?P<body>.*?)\n```", re.S)


def marked_blocks(text: str) -> list[tuple[str, str, str]]:
    """(language, body, overrides) of each marked block, in order."""
    return [(m["lang"], m["body"], (m["overrides"] or "").strip()) for m in MARK.finditer(text)]


def bash_script(body: str, overrides: str) -> str:
    lines = body.replace("\\\n", " ").splitlines()  # continuation lines joined, so overrides land on the command
    if overrides:
        lines = [re.sub(r"^(\s*selectune train\b[^#]*?)(\s*(#.*)?)$", rf"\1 {overrides}\2", line) for line in lines]
    return "set -euo pipefail\nselectune() { \"$PYTHON\" -m selectune \"$@\"; }\n" + "\n".join(lines) + "\n"


def write_custom_text(folder: Path) -> None:
    """The files README (c) names: reviews whose label the text gives away."""
    rows = [(f"the film was {'great' if i % 2 else 'awful'} number {i}", "pos" if i % 2 else "neg") for i in range(24)]
    (folder / "train.csv").write_text("review,sentiment\n" + "".join(f"{t},{label}\n" for t, label in rows))
    (folder / "dev.jsonl").write_text("".join(json.dumps({"review": t, "sentiment": label}) + "\n"
                                              for t, label in rows[:8]))


@pytest.mark.parametrize("doc", ["README.md", "docs/api.md"])
def test_marked_examples_run_as_written(doc, glue_root, tmp_path, monkeypatch):
    blocks = marked_blocks((REPO / doc).read_text())
    assert blocks, f"{doc} marks no block to run"
    write_custom_text(tmp_path)
    env = {**os.environ, "SELECTUNE_DATA": str(glue_root), "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SELECTUNE_DATA", str(glue_root))
    namespace: dict = {"__name__": "__doctest__"}
    for number, (lang, body, overrides) in enumerate(blocks, start=1):
        if lang == "bash":
            result = subprocess.run(["bash", "-c", bash_script(body, overrides)], cwd=tmp_path, env=env, text=True,
                                    capture_output=True, timeout=600)
            assert result.returncode == 0, f"{doc} block {number}:\n{body}\n{result.stdout}\n{result.stderr}"
            assert "Traceback" not in result.stderr, result.stderr
        elif lang == "python":
            exec(compile(body, f"{doc} block {number}", "exec"), namespace)  # the docs' own code, in order
        else:
            raise AssertionError(f"{doc} block {number}: a doctest block must be bash or python, not {lang}")


def test_the_marker_finds_blocks_and_places_overrides():
    text = "x\n<!-- doctest: a=1 -->\n```bash\nselectune train r \\\n  b=2  # note\nls\n```\n\n```bash\nno\n```\n"
    [(lang, body, overrides)] = marked_blocks(text)
    assert (lang, overrides) == ("bash", "a=1")
    assert "selectune train r    b=2 a=1  # note\nls" in bash_script(body, overrides)
