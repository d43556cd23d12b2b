"""Exact selections of entries across many tensors, shared by every selective method.

Budgets are exact: `select_k` returns exactly k entries (a stable tie-break by tensor name, then flat
index, so two runs agree bit for bit), and every selection has a short hash that runs log, so two
runs' masks can be compared at a glance (docs/design.md, "Budget").
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from selectune.errors import SelectuneError


def select_k(scores: dict[str, torch.Tensor], k: int, largest: bool) -> dict[str, torch.Tensor]:
    """The k entries with the largest (or smallest) score over all tensors: sorted int32 flat indices
    per tensor (tensors with none selected are left out). Ties at the threshold go to the earliest
    (tensor name, flat index)."""
    names = sorted(scores)
    total = sum(scores[n].numel() for n in names)
    if not 0 < k <= total:
        raise SelectuneError(f"budget of {k:,} entries does not fit the {total:,} selectable entries "
                             f"of {len(names)} tensors")
    flat = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in names])
    if largest:
        flat = -flat
    threshold = torch.kthvalue(flat, k).values
    below = flat < threshold
    tied = flat == threshold
    need = k - int(below.sum())
    chosen = below | (tied & (torch.cumsum(tied, 0) <= need))
    assert int(chosen.sum()) == k, "exact budget violated"
    return split_mask(chosen, {n: scores[n].numel() for n in names})


def select_below(values: dict[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    """Entries with |value| < threshold (SaRA's rule), as sorted int32 flat indices per tensor."""
    names = sorted(values)
    flat = torch.cat([values[n].detach().reshape(-1).abs().float().cpu() for n in names])
    return split_mask(flat < threshold, {n: values[n].numel() for n in names})


def split_mask(mask: torch.Tensor, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, size in sizes.items():
        idx = torch.nonzero(mask[start:start + size]).reshape(-1).to(torch.int32)
        if idx.numel():
            out[name] = idx
        start += size
    return out


def count(indices: dict[str, torch.Tensor]) -> int:
    return sum(i.numel() for i in indices.values())


def overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    """How alike two selections (sorted flat indices per tensor) are: the entries both hold, and the
    tensors only one of them touches with the entries it spends there. Two runs of one method that
    differ by a seed, or two methods on one seed, can then be told apart from chance (k_a·k_b / N
    shared entries for two uniform random masks of N entries)."""
    a = {n: i for n, i in a.items() if i.numel()}
    b = {n: i for n, i in b.items() if i.numel()}
    shared = sum(int(torch.isin(a[n], b[n]).sum()) for n in a.keys() & b.keys())
    only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    return {"a": count(a), "b": count(b), "shared": shared, "tensors_a": len(a), "tensors_b": len(b),
            "tensors_only_a": only_a, "tensors_only_b": only_b,
            "entries_only_a_tensors": sum(a[n].numel() for n in only_a),
            "entries_only_b_tensors": sum(b[n].numel() for n in only_b)}


def mask_hash(indices: dict[str, torch.Tensor]) -> str:
    """A short hash of a selection (names + indices): equal hashes, equal masks."""
    digest = hashlib.sha256()
    for name in sorted(indices):
        digest.update(name.encode() + b":")
        digest.update(indices[name].to(torch.int32).cpu().numpy().tobytes())
    return digest.hexdigest()[:12]
