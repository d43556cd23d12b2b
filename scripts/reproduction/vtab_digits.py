"""Real images end to end on the vision path: scikit-learn's digits (1,797 real 8x8 scans) and the
shared dtd10 textures (600 real photos) written into the VTAB-1k folder layout, and the shared
cifar10_1k and fashion_mnist_1k (already in that layout) linked beside them: one data root for the four.

    python scripts/reproduction/vtab_digits.py <root>
        # writes <root>/vtab-1k/{digits,dtd10,cifar10_1k,fashion_mnist_1k}
    SELECTUNE_DATA=<root> selectune train recipe=vtab/dtd_lora model=vit_micro_random task=vtab/custom \\
        task.name=digits task.num_classes=10 task.protocol=final trainer=vtab_short

digits: 800 train / 200 val / 797 test, upscaled to 32 px PNG. dtd10: the shared data's 400 training
images split 320 / 80 (train800 / val200 roles, stratified, seeded) + its 200 test images.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def write_lists(folder: Path, splits: dict[str, list[tuple[str, int]]]) -> None:
    names = {"train": "train800", "val": "val200", "test": "test"}
    for split, rows in splits.items():
        (folder / f"{names[split]}.txt").write_text("".join(f"{p} {y}\n" for p, y in rows))
    (folder / "train800val200.txt").write_text("".join(f"{p} {y}\n" for p, y in splits["train"] + splits["val"]))


def digits(root: Path) -> None:
    from sklearn.datasets import load_digits

    data = load_digits()
    folder = root / "vtab-1k" / "digits"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    order = list(range(len(data.target)))
    random.Random(0).shuffle(order)
    rows = []
    for i in order:
        pixels = (data.images[i] / 16.0 * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((32, 32), Image.NEAREST).save(folder / "images" / f"{i:04d}.png")
        rows.append((f"images/{i:04d}.png", int(data.target[i])))
    write_lists(folder, {"train": rows[:800], "val": rows[800:1000], "test": rows[1000:]})


def dtd10(root: Path, shared: Path) -> None:
    source = shared / "vtab" / "dtd10"
    if not source.is_dir():
        print(f"no {source}: skipping dtd10")
        return
    folder = root / "vtab-1k" / "dtd10"
    if not (folder / "images").exists():
        shutil.copytree(source / "images", folder / "images")
    train = [(p, int(y)) for p, y in (line.rsplit(maxsplit=1) for line in (source / "train.txt").read_text().split("\n")
                                      if line.strip())]
    test = [(p, int(y)) for p, y in (line.rsplit(maxsplit=1) for line in (source / "test.txt").read_text().split("\n")
                                     if line.strip())]
    rng = random.Random(0)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for row in train:
        by_class.setdefault(row[1], []).append(row)
    train_rows, val_rows = [], []
    for rows in by_class.values():
        rng.shuffle(rows)
        train_rows += rows[: len(rows) * 4 // 5]
        val_rows += rows[len(rows) * 4 // 5:]
    write_lists(folder, {"train": train_rows, "val": val_rows, "test": test})


def link_shared(root: Path, shared: Path) -> None:
    """cifar10_1k and fashion_mnist_1k are in the layout already: a symbolic link, no copy."""
    for name in ("cifar10_1k", "fashion_mnist_1k"):
        source, link = shared / "vtab" / name, root / "vtab-1k" / name
        if not source.is_dir():
            print(f"no {source}: skipping {name}")
        elif not link.exists():
            link.symlink_to(source.resolve(), target_is_directory=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data")
    args = parser.parse_args()
    digits(args.root)
    dtd10(args.root, args.shared)
    link_shared(args.root, args.shared)
    print(f"wrote {args.root}/vtab-1k/digits and dtd10, linked cifar10_1k and fashion_mnist_1k")


if __name__ == "__main__":
    main()
