"""Did two runs change the same weights? Overlap of the sparse masks of stored deltas, pair by pair.

    python scripts/analysis/mask_overlap.py <run A> <run B> [<run A> <run B> ...] [--write docs/results.md]

For each pair (run directories or delta files): the entries each stored, the entries both stored against
what two uniform random masks of that size would share (k_A·k_B / N), and the tensors only one of the two
touched with the entries it spent there. The dense task head is not a mask and is left out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from selectune.delta.taskdelta import TaskDelta
from selectune.errors import SelectuneError
from selectune.selection import overlap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import write_section


def label(delta: TaskDelta) -> str:
    """method task seed, and the S-Diff grouping when it is not the paper's one group per tensor."""
    meta = delta.meta
    rows = OmegaConf.select(OmegaConf.create(meta["config"]), "method.group_rows") if "config" in meta else None
    grouping = f" (group_rows={rows})" if rows else ""
    return f"{meta.get('method', '?')}{grouping} {meta.get('task', '?')} {meta.get('seed', '?')}"


def row(a: TaskDelta, b: TaskDelta) -> str:
    backbone = {d.meta.get("budget", {}).get("backbone") for d in (a, b)}
    if len(backbone) != 1 or None in backbone:
        raise SelectuneError(f"{label(a)} and {label(b)}: deltas of different (or unnamed) backbones")
    n = backbone.pop()
    o = overlap(a.sparse_indices(), b.sparse_indices())
    if not o["a"] or not o["b"]:
        raise SelectuneError(f"{label(a)} / {label(b)}: no sparse entries to compare (not a selective method?)")
    chance = o["a"] * o["b"] / n
    return (f"| {label(a)} | {label(b)} | {o['a']:,} / {o['b']:,} | {o['shared']:,} "
            f"({100 * o['shared'] / min(o['a'], o['b']):.1f}%) | {chance:,.0f} | {o['tensors_a']} / {o['tensors_b']} | "
            f"{len(o['tensors_only_a'])} ({o['entries_only_a_tensors']:,}) / "
            f"{len(o['tensors_only_b'])} ({o['entries_only_b_tensors']:,}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="pairs: A B [A B ...]")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    if len(args.runs) % 2:
        parser.error(f"give runs in pairs (A B ...); got {len(args.runs)}")
    try:
        deltas = [TaskDelta.load(run) for run in args.runs]
        rows = [row(a, b) for a, b in zip(deltas[::2], deltas[1::2], strict=True)]
    except SelectuneError as err:
        raise SystemExit(f"error: {err}") from None
    table = "\n".join(["| A | B | entries A / B | shared (of the smaller) | shared by chance | tensors touched "
                       "A / B | tensors only A (entries) / only B (entries) |", "|---|---|---|---|---|---|---|",
                       *rows])
    print(table)
    if args.write:
        command = "python scripts/analysis/mask_overlap.py " + " ".join(str(r) for r in args.runs)
        write_section(args.write, "mask_overlap", "### Which weights the stored deltas changed (mask overlap)\n\n"
                      f"Made by `{command}` (run directories of the diff-pruning grid).\n\n" + table)


if __name__ == "__main__":
    main()
