"""Tokenised examples and dynamically padded batches.

Examples are tokenised once (truncated to the task's max length, not padded); each batch is padded
only to its own longest row, which on GLUE's short sentences saves most of the compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selectune.tasks.example import Example


@dataclass
class EncodedSplit:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: torch.Tensor  # long for classification, float for regression

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, rows: list[int]) -> EncodedSplit:
        types = None if self.token_type_ids is None else [self.token_type_ids[i] for i in rows]
        return EncodedSplit([self.input_ids[i] for i in rows], types, self.labels[rows])


def encode(tokenizer, examples: list[Example], max_length: int, regression: bool) -> EncodedSplit:
    columns = list(zip(*(ex.texts for ex in examples), strict=True))
    enc = tokenizer(*[list(c) for c in columns], truncation=True, max_length=max_length, padding=False)
    dtype = torch.float32 if regression else torch.long
    return EncodedSplit(enc["input_ids"], enc.get("token_type_ids"),
                        torch.tensor([ex.label for ex in examples], dtype=dtype))


def collate(split: EncodedSplit, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad the rows `indices` of a split to their longest length."""
    width = max(len(split.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    types = torch.zeros((len(indices), width), dtype=torch.long) if split.token_type_ids is not None else None
    for row, i in enumerate(indices):
        n = len(split.input_ids[i])
        ids[row, :n] = torch.tensor(split.input_ids[i])
        mask[row, :n] = 1
        if types is not None:
            types[row, :n] = torch.tensor(split.token_type_ids[i])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": split.labels[indices]}
    if types is not None:
        batch["token_type_ids"] = types
    return batch


def eval_batches(split: EncodedSplit, batch_size: int) -> list[list[int]]:
    """Evaluation order: sorted by length (less padding), results are put back in row order."""
    order = sorted(range(len(split)), key=lambda i: len(split.input_ids[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def train_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled batches of one epoch; a function of (seed, epoch) only, so a resumed run replays them."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
