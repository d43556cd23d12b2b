"""Encoded splits that make their own batches: tokenised text, or images read on demand.

Text is tokenised once (truncated to the task's max length, not padded); each batch is padded only to
its own longest row, which on GLUE's short sentences saves most of the compute. Images are read,
resized and normalised per batch (a VTAB-1k test set would not fit in memory as tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from selectune.tasks.example import Example

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pad(sequences: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences right-padded with `value` to the longest of them, and the mask of the real tokens."""
    width = max(len(seq) for seq in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return out, mask


@dataclass
class TextSplit:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: torch.Tensor  # long for classification, float for regression
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, rows: list[int]) -> TextSplit:
        types = None if self.token_type_ids is None else [self.token_type_ids[i] for i in rows]
        return TextSplit([self.input_ids[i] for i in rows], types, self.labels[rows], self.pad_id)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def eval_order(self) -> list[int]:
        """Rows sorted by length: less padding; results are put back in row order."""
        return sorted(range(len(self)), key=lambda i: len(self.input_ids[i]))

    def batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """The rows `rows`, padded to their longest length, with their labels."""
        ids, mask = pad([self.input_ids[i] for i in rows], self.pad_id)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": self.labels[rows]}
        if self.token_type_ids is not None:
            batch["token_type_ids"] = pad([self.token_type_ids[i] for i in rows], 0)[0]
        return batch


@dataclass
class ImageSplit:
    paths: list[Path]
    labels: torch.Tensor
    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, rows: list[int]) -> ImageSplit:
        return ImageSplit([self.paths[i] for i in rows], self.labels[rows], self.image_size, self.mean, self.std)

    def lengths(self) -> None:
        """Every image has the same size: nothing to group."""
        return None

    def eval_order(self) -> list[int]:
        return list(range(len(self)))

    def batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """RGB, resized to image_size² (bilinear, no crop or augmentation, as the references), normalised."""
        from PIL import Image

        pixels = np.empty((len(rows), 3, self.image_size, self.image_size), dtype=np.float32)
        for row, i in enumerate(rows):
            with Image.open(self.paths[i]) as image:
                rgb = image.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
            pixels[row] = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return {"pixel_values": torch.from_numpy((pixels - mean) / std), "labels": self.labels[rows]}


EncodedSplit = TextSplit | ImageSplit


def encode_text(tokenizer, examples: list[Example], max_length: int, regression: bool) -> TextSplit:
    columns = list(zip(*(ex.texts for ex in examples), strict=True))
    enc = tokenizer(*[list(c) for c in columns], truncation=True, max_length=max_length, padding=False)
    dtype = torch.float32 if regression else torch.long
    return TextSplit(enc["input_ids"], enc.get("token_type_ids"),
                     torch.tensor([ex.label for ex in examples], dtype=dtype), tokenizer.pad_token_id)


def eval_batches(split: EncodedSplit, batch_size: int) -> list[list[int]]:
    order = split.eval_order()
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


GROUP_BATCHES = 50  # batches per length-sorted window (transformers' LengthGroupedSampler uses 50 too)


def train_batches(n: int, batch_size: int, seed: int, epoch: int,
                  lengths: list[int] | None = None) -> list[list[int]]:
    """The shuffled batches of one epoch; a function of (seed, epoch) only, so a resumed run replays them.

    With `lengths`, rows are grouped by length as transformers' `group_by_length` does: the shuffled order
    is cut into windows of GROUP_BATCHES batches, each window sorted by length into batches, and the
    batches shuffled again. Each batch then pads to a length close to its rows', while which rows meet
    in a batch, and the batch order, stay random from epoch to epoch."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    if lengths is None:
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    window = GROUP_BATCHES * batch_size
    grouped: list[int] = []
    for start in range(0, n, window):
        grouped += sorted(order[start:start + window], key=lambda i: -lengths[i])
    batches = [grouped[i:i + batch_size] for i in range(0, n, batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]
