"""Memory and time of the exact top-k selection (`selection.select_k`) and of SPT's ranking
(`sensitivity.Ranking`) at a decoder's scale, each against the flat form it replaced: one concatenated copy of
every score with kthvalue and a cumulative count over all entries (select_k), one stable sort of all entries
with int64 order and owners (Ranking).

    python scripts/bench/bench_select.py [--shape smollm2] [--fraction 0.005] [--write docs/benchmarks.md]

Scores are |w| of random matrices shaped as SmolLM2-135M's 210 linear weights (30 layers x q, k, v, o, gate,
up, down: 106,168,320 entries): for select_k SaRA's rule (the smallest 0.5%), for the ranking the counts and
entries of the top 0.5% (what SPT asks of it). Each form runs in its own process, so its peak RSS is its own;
the scores (424 MB) are made before the clock starts and counted in every peak; each pair of forms is checked
to select the same entries.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import publish

SHAPES = {"smollm2": [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30,
          "small": [(64, 64), (64, 256), (256, 64)] * 4}


def flat_select_k(scores, k: int, largest: bool):
    """The previous select_k (for comparison only): one flat copy of all scores, kthvalue, a cumsum of ties."""
    import torch

    from selectune.selection import split_mask

    names = sorted(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in names])
    if largest:
        flat = -flat
    threshold = torch.kthvalue(flat, k).values
    below = flat < threshold
    tied = flat == threshold
    need = k - int(below.sum())
    chosen = below | (tied & (torch.cumsum(tied, 0) <= need))
    return split_mask(chosen, {n: scores[n].numel() for n in names})


class FlatRanking:
    """The previous Ranking (for comparison only): all entries in one stable sort, int64 order and owners."""

    def __init__(self, scores) -> None:
        import torch

        self.names = sorted(scores)
        flat = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in self.names])
        self.order = torch.sort(-flat, stable=True).indices
        sizes = torch.tensor([scores[n].numel() for n in self.names])
        self.owner = torch.repeat_interleave(torch.arange(len(self.names)), sizes)[self.order]
        self.offsets = torch.cumsum(sizes, 0) - sizes

    def top(self, tau: int):
        import torch

        chosen, owner = self.order[:tau], self.owner[:tau]
        return {name: (chosen[owner == i] - self.offsets[i]).sort().values.to(torch.int32)
                for i, name in enumerate(self.names) if (owner == i).any()}


def child(form: str, shape: str, fraction: float) -> dict:
    import hashlib

    import torch

    from selectune.selection import select_k
    from selectune.sensitivity import Ranking

    gen = torch.Generator().manual_seed(0)
    scores = {f"m{i:03d}": torch.randn(s, generator=gen).abs() for i, s in enumerate(SHAPES[shape])}
    total = sum(t.numel() for t in scores.values())
    k = int(total * fraction)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if form in ("radix", "flat"):
        chosen = (select_k if form == "radix" else flat_select_k)(scores, k, largest=False)
    else:  # the ranking: built once, then the top k (largest scores)
        chosen = (Ranking if form == "ranking" else FlatRanking)(scores).top(k)
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256(b"".join(n.encode() + chosen[n].numpy().tobytes() for n in sorted(chosen))).hexdigest()
    return {"form": form, "entries": total, "k": k, "seconds": seconds, "rss_before_mb": before,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "digest": digest[:12]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2", choices=list(SHAPES))
    parser.add_argument("--fraction", type=float, default=0.005)
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.shape, args.fraction)))
        return
    rows = []
    for form in ("flat", "radix", "flat_ranking", "ranking"):
        out = subprocess.run([sys.executable, __file__, "--child", form, "--shape", args.shape, "--fraction",
                              str(args.fraction)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    if rows[0]["digest"] != rows[1]["digest"] or rows[2]["digest"] != rows[3]["digest"]:
        raise SystemExit("two forms selected different entries")
    import torch

    lines = ["| form | entries | k | seconds | RSS before (scores made) MiB | peak RSS MiB | peak − before MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['form']} | {r['entries']:,} | {r['k']:,} | {r['seconds']:.2f} | {r['rss_before_mb']:.0f} "
                     f"| {r['peak_mb']:.0f} | {r['peak_mb'] - r['rss_before_mb']:.0f} |")
    body = (f"### Exact top-k selection and SPT's ranking at a decoder's scale\n\nGenerated {datetime.date.today()} by "
            f"`python scripts/bench/bench_select.py {' '.join(sys.argv[1:])}` on {platform.machine()}, "
            f"{os.cpu_count()} CPU cores (shared, busy), torch {torch.__version__}, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}: the smallest {args.fraction:.1%} of |w| over "
            f"SmolLM2-shaped random matrices (select_k: the smallest; the SPT ranking: the top), one process per "
            f"form; each pair selects the same entries (sha256 {rows[1]['digest']}, {rows[3]['digest']}).\n\n"
            + "\n".join(lines))
    publish(body, args.write, "bench:select")


if __name__ == "__main__":
    main()
