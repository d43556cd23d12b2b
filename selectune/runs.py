"""Finding the run a user means: `run=runs/mrpc_full` names the recipe's run folder, not one run.

Each `selectune train` lands in a new timestamped folder below `runs/<task>_<method>/`; a user who just
trained should not have to look its name up. A folder that holds no delta itself but finished runs below
it stands for the newest of them (by when its results.json was written), and the command says which one
it took, so nothing is chosen silently.
"""

from __future__ import annotations

import sys
from pathlib import Path

from selectune.errors import SelectuneError

DELTA = "delta.safetensors"
FINISHED = "results.json"  # written last by train: a folder with it (and a delta) is a finished run


def finished_runs(folder: Path) -> list[Path]:
    """Finished runs directly below `folder` (or one level deeper: a multirun's jobs), newest first."""
    found = [p.parent for pattern in (f"*/{FINISHED}", f"*/*/{FINISHED}") for p in folder.glob(pattern)
             if (p.parent / DELTA).is_file() and not p.parent.is_symlink()]
    return sorted(set(found), key=lambda run: ((run / FINISHED).stat().st_mtime, run.name), reverse=True)


def resolve_run(run: str, command: str) -> str:
    """The delta file or run folder `run=` means: itself when it holds a delta (or is a file), else the newest
    finished run below it, said in one line on stderr. A folder with none is refused in one line."""
    path = Path(run)
    if not path.is_dir() or (path / DELTA).exists():
        return run  # a delta file, a run folder, or nothing there: the loader names what is missing
    runs = finished_runs(path)
    if not runs:
        unfinished = [p.parent.name for p in path.glob("*/config.yaml")]
        why = f" ({len(unfinished)} unfinished: {', '.join(sorted(unfinished)[:3])})" if unfinished else ""
        raise SelectuneError(f"no task delta at {path} and no finished run below it{why}; give a run folder "
                             f"holding {DELTA}, or a delta file")
    chosen = runs[0]
    others = f" (newest of {len(runs)} finished runs)" if len(runs) > 1 else ""
    print(f"{command}: using {chosen}{others}", file=sys.stderr)
    return str(chosen)
