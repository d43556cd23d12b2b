"""Memory and time of the exact top-k selection (`selection.select_k`) at a decoder's scale, against the flat
form it replaced (one concatenated copy of every score, kthvalue, a cumulative count over all entries).

    python scripts/bench/bench_select.py [--shape smollm2] [--fraction 0.005] [--write docs/benchmarks.md]

Scores are |w| of random matrices shaped as SmolLM2-135M's 210 linear weights (30 layers x q, k, v, o, gate,
up, down: 106,168,320 entries), SaRA's rule (the smallest |w|, 0.5%). Each form runs in its own process, so
its peak RSS is its own; the scores (424 MB) are made before the clock starts and counted in both peaks; the
two selections are checked equal.
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
from docsection import write_section

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


def child(form: str, shape: str, fraction: float) -> dict:
    import hashlib

    import torch

    from selectune.selection import select_k

    gen = torch.Generator().manual_seed(0)
    scores = {f"m{i:03d}": torch.randn(s, generator=gen).abs() for i, s in enumerate(SHAPES[shape])}
    total = sum(t.numel() for t in scores.values())
    k = int(total * fraction)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    chosen = (select_k if form == "radix" else flat_select_k)(scores, k, largest=False)
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
    for form in ("flat", "radix"):
        out = subprocess.run([sys.executable, __file__, "--child", form, "--shape", args.shape, "--fraction",
                              str(args.fraction)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    if rows[0]["digest"] != rows[1]["digest"]:
        raise SystemExit("the two forms selected different entries")
    import torch

    lines = ["| form | entries | k | seconds | RSS before (scores made) MiB | peak RSS MiB | peak − before MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['form']} | {r['entries']:,} | {r['k']:,} | {r['seconds']:.2f} | {r['rss_before_mb']:.0f} "
                     f"| {r['peak_mb']:.0f} | {r['peak_mb'] - r['rss_before_mb']:.0f} |")
    body = (f"### Exact top-k selection at a decoder's scale\n\nGenerated {datetime.date.today()} by "
            f"`python scripts/bench/bench_select.py {' '.join(sys.argv[1:])}` on {platform.machine()}, "
            f"{os.cpu_count()} CPU cores (shared, busy), torch {torch.__version__}, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}: the smallest {args.fraction:.1%} of |w| over "
            f"SmolLM2-shaped random matrices, one process per form, the same selection (sha256 "
            f"{rows[1]['digest']}).\n\n" + "\n".join(lines))
    print(body)
    if args.write:
        write_section(args.write, "bench:select", body)


if __name__ == "__main__":
    main()
