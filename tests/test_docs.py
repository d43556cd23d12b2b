"""The README's and docs/api.md's examples run as written: every fenced block marked `<!-- doctest -->` (or
`<!-- doctest: <overrides> -->`, appended to each `selectune train` line so a minutes-long run takes seconds)
is run in order, in one fresh folder per document with the tiny GLUE data and the files the README's custom
text example names. A bash block of plain `selectune ...` lines runs each through run_cli (the worker's
pre-imported interpreter, as every CLI test); any other bash block runs in bash with `selectune` as this
Python's `-m selectune`; python blocks run in one namespace per document, so a later block uses what an earlier
one made. Unmarked blocks (installs, torchrun, sweeps, hour-long reproductions) are not run."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from conftest import REPO, run_cli

MARK = re.compile(r"<!-- doctest(?::\s*(?P<overrides>[^>]*?))?\s*-->\s*\n```(?P<lang>\w+)\n(?P<body>.*?)\n```", re.S)


def marked_blocks(text: str) -> list[tuple[str, str, str]]:
    """(language, body, overrides) of each marked block, in order."""
    return [(m["lang"], m["body"], (m["overrides"] or "").strip()) for m in MARK.finditer(text)]


def block_lines(body: str, overrides: str) -> list[str]:
    """The block's command lines, continuations joined and the overrides appended to each `selectune train`."""
    lines = body.replace("\\\n", " ").splitlines()
    if overrides:
        lines = [re.sub(r"^(\s*selectune train\b[^#]*?)(\s*(#.*)?)$", rf"\1 {overrides}\2", line) for line in lines]
    return lines


def bash_script(body: str, overrides: str) -> str:
    return ("set -euo pipefail\nselectune() { \"$PYTHON\" -m selectune \"$@\"; }\n"
            + "\n".join(block_lines(body, overrides)) + "\n")


QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def plain_calls(body: str, overrides: str, cwd: Path) -> list[list[str]] | None:
    """Each line's arguments where every line of the block is one plain `selectune ...` command (words, quoted
    words, `$PWD`, a trailing comment): such a block runs through run_cli, as the other CLI tests do, without a
    fresh interpreter per call. None where bash must run it (pipes, redirections, other variables, globs, ...)."""
    calls = []
    for line in block_lines(body, overrides):
        if not line.strip():
            continue
        masked = QUOTED.sub(lambda m: "_" * len(m.group()), line)  # quoted words blanked, positions kept
        comment = re.search(r"(^|\s)#", masked)  # bash's comment starts a word; a # inside a word is a letter
        line, masked = (line[:comment.start()], masked[:comment.start()]) if comment else (line, masked)
        quoted = QUOTED.findall(line)
        if re.search(r"[#|&;<>()`*?\[\]{}~\\$]", masked) or re.search(r"\$PWD\w", line) \
                or any("$" in q.replace("$PWD", "") or "`" in q or (q[0] == "'" and "$" in q) for q in quoted):
            return None
        args = shlex.split(line.replace("$PWD", str(cwd)))
        if not args or args[0] != "selectune":
            return None
        calls.append(args[1:])
    return calls


def write_custom_text(folder: Path) -> None:
    """The files README (c) names: reviews whose label the text gives away."""
    rows = [(f"the film was {'great' if i % 2 else 'awful'} number {i}", "pos" if i % 2 else "neg") for i in range(24)]
    (folder / "train.csv").write_text("review,sentiment\n" + "".join(f"{t},{label}\n" for t, label in rows))
    (folder / "dev.jsonl").write_text("".join(json.dumps({"review": t, "sentiment": label}) + "\n"
                                              for t, label in rows[:8]))


def run_bash_block(body: str, overrides: str, cwd: Path, env: dict[str, str]) -> Iterator[CompletedProcess]:
    """Each call's result in turn: a plain block's calls through run_cli, any other block whole in bash."""
    calls = plain_calls(body, overrides, cwd)
    if calls is None:
        yield subprocess.run(["bash", "-c", bash_script(body, overrides)], cwd=cwd, env=env, text=True,
                             capture_output=True, timeout=600)
        return
    for args in calls:
        yield run_cli(*args, cwd=cwd, timeout=600)


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
            for result in run_bash_block(body, overrides, tmp_path, env):  # stops at a failed call, as `set -e`
                assert result.returncode == 0, f"{doc} block {number}:\n{body}\n{result.stdout}\n{result.stderr}"
                assert "Traceback" not in result.stderr, result.stderr
        elif lang == "python":
            exec(compile(body, f"{doc} block {number}", "exec"), namespace)  # the docs' own code, in order
        else:
            raise AssertionError(f"{doc} block {number}: a doctest block must be bash or python, not {lang}")


def test_plain_blocks_run_through_the_cli_runner_and_the_rest_through_bash(tmp_path):
    body = 'selectune train r \\\n  b=2  # a (note) | here\nselectune cp x "y=[file://$PWD/conf]"'
    assert plain_calls(body, "a=1", tmp_path) == [["train", "r", "b=2", "a=1"], ["cp", "x", f"y=[file://{tmp_path}/conf]"]]
    for shell in ("selectune ls | head", "selectune ls > out", "ls", "selectune ls $HOME", "selectune ls 'x$PWD'",
                  "selectune ls *.yaml", "selectune ls; ls", "selectune ls && ls", "x=1 selectune ls",
                  "selectune x a#b c", 'selectune x "$PWDX"'):
        assert plain_calls(shell, "", tmp_path) is None, shell


def test_the_marker_finds_blocks_and_places_overrides():
    text = "x\n<!-- doctest: a=1 -->\n```bash\nselectune train r \\\n  b=2  # note\nls\n```\n\n```bash\nno\n```\n"
    [(lang, body, overrides)] = marked_blocks(text)
    assert (lang, overrides) == ("bash", "a=1")
    assert "selectune train r    b=2 a=1  # note\nls" in bash_script(body, overrides)
