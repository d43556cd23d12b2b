"""bf16 against fp32, paired by seed: the table behind a precision default.

    python scripts/analysis/precision_pairs.py <folder> [--section results:bf16_check_vision] [--write docs/results.md]

<folder> holds run folders named `<anything>_fp32_s<seed>` and `<anything>_bf16_s<seed>` (one recipe, the two
precisions, the same seeds: `selectune train recipe=<r> trainer.precision=<fp32|bf16> trainer.seed=<s>
out_dir=<folder>/<name>_<precision>_s<seed>`). Each pair's primary metric on the split the run was scored
on, its difference, and each precision's s/step; the mean and sample std over seeds.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--section", default="results:bf16_check_vision")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    runs: dict[int, dict[str, dict]] = {}
    for path in sorted(args.folder.glob("*_s*/results.json")):
        found = re.fullmatch(r"(.+)_(fp32|bf16)_s(\d+)", path.parent.name)
        if found:
            runs.setdefault(int(found.group(3)), {})[found.group(2)] = json.loads(path.read_text())
    pairs = {seed: r for seed, r in sorted(runs.items()) if set(r) == {"fp32", "bf16"}}
    if not pairs:
        raise SystemExit(f"no fp32/bf16 pair of finished runs in {args.folder}")

    def score(r: dict) -> float:
        metrics = r["metrics"][r["selected_on"]]
        return metrics[r.get("primary") or next(iter(metrics))]

    first = next(iter(pairs.values()))["fp32"]
    split, metric = first["selected_on"], first.get("primary") or next(iter(first["metrics"][first["selected_on"]]))
    lines = [f"| seed | fp32 {metric} | bf16 {metric} | bf16 − fp32 | s/step fp32 | s/step bf16 |",
             "|---|---|---|---|---|---|"]
    diffs, f32, b16 = [], [], []
    for seed, r in pairs.items():
        a, b = score(r["fp32"]), score(r["bf16"])
        diffs.append(b - a)
        f32.append(a)
        b16.append(b)
        lines.append(f"| {seed} | {a:.2f} | {b:.2f} | {b - a:+.2f} | {r['fp32']['step_time_s']:.2f} | "
                     f"{r['bf16']['step_time_s']:.2f} |")

    def ms(values: list[float]) -> str:
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"

    lines.append(f"| mean ± std | {ms(f32)} | {ms(b16)} | {ms(diffs)} | | |")
    body = (f"{first['task']} · {first['method']} · {first['model']}, {split} split, seeds "
            f"{', '.join(map(str, pairs))} (`python scripts/analysis/precision_pairs.py {args.folder.name}`):\n\n"
            + "\n".join(lines))
    publish(body, args.write, args.section)


if __name__ == "__main__":
    main()
