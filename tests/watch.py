"""What a refusal may change: nothing. Helpers for tests that watch a scratch root while the real CLI runs.

`tree` fingerprints every entry under a folder (sha256 of each file, a link's target, "dir"), hidden ones
included, so two calls compare byte-identical; `one_line` checks an exit code and a single error line.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from conftest import TINY, run_cli

R = ["recipe=glue/rte_bitfit", *TINY, "task.max_train_examples=64", "task.max_eval_examples=32",
     "trainer.max_steps=2"]


def tree(root: Path) -> dict[str, str]:
    """Every entry under `root`: its sha256, a link's target, or "dir"."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = "-> " + os.readlink(path)
        elif path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[key] = "dir"
    return out


def one_line(result: subprocess.CompletedProcess, *patterns: str, code: int = 2) -> str:
    """The exact exit code and exactly one output line, `selectune: error: ...` holding `patterns`."""
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == code, (result.returncode, result.stdout[-1500:], result.stderr[-1500:])
    assert len(lines) == 1 and lines[0].startswith("selectune: error: "), lines[-20:]
    for pattern in patterns:
        assert pattern in lines[0], lines[0]
    return lines[0]


def cli(*args: str, cwd: Path, data: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m selectune ...` in `cwd`, its temp folder (Hydra's staging) inside `cwd` too: the watched root.
    A fork of the worker's pre-imported interpreter where that behaves the same (cli_runner.py), else a fresh one."""
    tmp = cwd / ".tmp"
    tmp.mkdir(exist_ok=True)
    return run_cli(*args, cwd=cwd, env={"SELECTUNE_DATA": str(data), "TMPDIR": str(tmp), **env})


def final_line(result: subprocess.CompletedProcess, *patterns: str, code: int = 2) -> str:
    """A run that printed progress before failing: the exact exit code, one error line, and it ends the output."""
    assert result.returncode == code, (result.returncode, result.stderr[-1500:])
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("selectune: error: ")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr[-1500:]
    for pattern in patterns:
        assert pattern in errors[0], errors[0]
    return errors[0]
