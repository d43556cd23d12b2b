"""Bytes on disk per stored number of a run's TaskDelta, in the default and the compact forms.

    python scripts/analysis/delta_bytes.py <run dir> [--write docs/results.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from selectune.delta.taskdelta import TaskDelta

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    delta = TaskDelta.load(args.run)
    result = json.loads((args.run / "results.json").read_text())
    rows = ["| form | bytes on disk | stored numbers | bytes per stored number |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for form in (None, "float16", "bfloat16"):
            size = delta.save(Path(tmp) / "d.safetensors", compact=form)
            name = "default (int32 indices, fp32 values)" if form is None else f"compact={form} (index gaps, {form})"
            rows.append(f"| {name} | {size:,} | {delta.stored:,} | {size / delta.stored:.2f} |")
    body = (f"### Bytes per stored number\n\n`python scripts/analysis/delta_bytes.py {args.run}`: "
            f"the {result['method']} delta "
            f"of {result['task']} ({result['budget']['stored_percent']:.2f}% of the backbone, head included), "
            f"header and metadata included.\n\n" + "\n".join(rows))
    publish(body, args.write, "results:delta_bytes")


if __name__ == "__main__":
    main()
