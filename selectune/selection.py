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


def select_k(scores: dict[str, torch.Tensor], k: int, largest: bool,
             magnitude: bool = False) -> dict[str, torch.Tensor]:
    """The k entries with the largest (or smallest) score over all tensors: sorted int32 flat indices
    per tensor (tensors with none selected are left out). Ties at the threshold go to the earliest
    (tensor name, flat index). `magnitude`: rank |score| (taken per tensor as it is read, so a caller
    ranking weights by size passes the weights, not a copy of them all).

    Found without one flat copy of every score: a radix select over int32 keys ordered as the floats, in
    two passes of 16 bits (a histogram of the high halves finds the threshold's bin, one of the low halves
    within that bin the threshold), then a pass that takes each tensor's entries below it. Memory is a few
    copies of the largest tensor, not of all of them: at a decoder's scale (SaRA over SmolLM2's 106M matrix
    entries) the flat copy, its sort buffer and a cumulative count cost gigabytes; at 7B parameters, ~100 GB."""
    names = sorted(scores)
    total = sum(scores[n].numel() for n in names)
    if not 0 < k <= total:
        raise SelectuneError(f"budget of {k:,} entries does not fit the {total:,} selectable entries "
                             f"of {len(names)} tensors")

    def keys(name: str) -> torch.Tensor:
        return order_keys(scores[name].detach().abs() if magnitude else scores[name], largest)

    high = torch.zeros(1 << 16, dtype=torch.long)
    for name in names:
        high += torch.bincount((keys(name) >> 16) + (1 << 15), minlength=1 << 16)
    cum = torch.cumsum(high, 0)
    top = int(torch.searchsorted(cum, k))  # the bin of high halves holding the k-th key
    before = int(cum[top - 1]) if top else 0
    low = torch.zeros(1 << 16, dtype=torch.long)
    for name in names:
        key = keys(name)
        low += torch.bincount(key[(key >> 16) + (1 << 15) == top] & 0xFFFF, minlength=1 << 16)
    cum = torch.cumsum(low, 0)
    bottom = int(torch.searchsorted(cum, k - before))
    threshold = ((top - (1 << 15)) << 16) | bottom  # the k-th smallest key
    need = k - before - (int(cum[bottom - 1]) if bottom else 0)  # ties at the threshold still to take
    out = {}
    for name in names:
        key = keys(name)
        chosen = key < threshold
        if need:
            tied = torch.nonzero(key == threshold).reshape(-1)[:need]
            chosen[tied] = True
            need -= tied.numel()
        idx = torch.nonzero(chosen).reshape(-1).to(torch.int32)
        if idx.numel():
            out[name] = idx
    assert count(out) == k, "exact budget violated"
    return out


def order_keys(scores: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """Flat int32 keys whose integer order is the scores' float order (reversed when `descending`): the
    float32 bits, with every bit but the sign flipped for negative numbers. -0.0 counts as 0.0."""
    bits = (scores.detach().reshape(-1).float().cpu() + 0.0).view(torch.int32)
    keys = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return ~keys if descending else keys


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
