"""Parameter sensitivity from a few training batches (docs/design.md "Sensitivity"; docs/methods.md, SPT).

    grad2      Σ_b g_b²            SPT's first-order Taylor sensitivity (FISH's Fisher diagonal)
    taylor     Σ_b |w · g_b|        first-order Taylor importance
    magnitude  |w|                  SaRA's rule (no pass needed)

One pass over `batches` training batches in a fixed, seeded order, with dropout off so the scores are
a function of the weights and the data only. Gradients are folded into fp32 accumulators as soon as
each one is ready (a post-accumulate hook) and then released, so the probe holds one extra dense
copy of the scored weights per requested score and never a second set of gradients.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from selectune.roles import is_embedding
from selectune.selection import order_keys

SCORES = ("grad2", "taylor", "magnitude")
# (pattern on the parameter name, module type) for the heat map's columns; BERT and ViT names
MODULE_TYPES = [(r"(attention\.(self|attention)\.query|\.q_proj)\.", "q"),
                (r"(attention\.(self|attention)\.key|\.k_proj)\.", "k"),
                (r"(attention\.(self|attention)\.value|\.v_proj)\.", "v"),
                (r"(attention\.output\.dense|\.o_proj)\.", "o"),
                (r"(intermediate\.dense|\.fc1|\.up_proj)\.", "ffn-in"),
                (r"(\.output\.dense|\.fc2|\.down_proj)\.", "ffn-out")]
TYPE_ORDER = [t for _, t in MODULE_TYPES]
# Llama's gated MLP has a third matrix (gate_proj, beside up_proj = ffn-in and down_proj = ffn-out): its own
# column, shown only for models that have it (selectune.roles names the roles per architecture)
MODULE_TYPES.append((r"\.gate_proj\.", "gate"))


def module_type(name: str) -> str | None:
    for pattern, kind in MODULE_TYPES:
        if re.search(pattern, name):
            return kind
    return None


def layer_index(name: str) -> int | None:
    found = re.search(r"layers?\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def candidates(model: nn.Module, head: frozenset[str], include_embeddings: bool = False) -> list[str]:
    """What sensitivity ranks (as SPT): encoder matrices and vectors; not the head, not embeddings (BERT's
    `embeddings.*`, Llama's `embed_tokens`, which a tied LM head shares: selectune.roles)."""
    return [n for n, _ in model.named_parameters() if n not in head and (include_embeddings or not is_embedding(n))]


def probe(model: nn.Module, names: list[str], batches: Iterable[dict[str, torch.Tensor]], loss_fn,
          scores: tuple[str, ...] = ("grad2",), reduce=lambda grad: grad) -> dict[str, dict[str, torch.Tensor]]:
    """{score: {parameter name: fp32 tensor}} accumulated over `batches` (see module docstring)."""
    unknown = set(scores) - set(SCORES)
    if unknown:
        raise ValueError(f"unknown sensitivity score(s) {sorted(unknown)}; known: {', '.join(SCORES)}")
    params = {n: model.get_parameter(n) for n in names}
    out: dict[str, dict[str, torch.Tensor]] = {s: {} for s in scores}
    if "magnitude" in scores:
        out["magnitude"] = {n: p.detach().abs().float() for n, p in params.items()}
    gradient_scores = [s for s in scores if s != "magnitude"]
    if not gradient_scores:
        return out
    for s in gradient_scores:
        out[s] = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)

    def fold(name: str):
        def hook(param: torch.Tensor) -> None:
            grad = reduce(param.grad.float())  # the batch gradient, also when ranks hold shards
            if "grad2" in out:
                out["grad2"][name].add_(grad.square())
            if "taylor" in out:
                out["taylor"][name].add_((param.detach().float() * grad).abs())
            param.grad = None
        return hook

    handles = [p.register_post_accumulate_grad_hook(fold(n)) for n, p in params.items()]
    try:
        model.eval()
        for batch in batches:
            labels = batch["labels"]
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            loss_fn(model(**inputs).logits, labels).backward()
    finally:
        for handle in handles:
            handle.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    return out


class Ranking:
    """Every entry of many tensors ranked by score (descending; ties by tensor name, then flat index), so the
    per-tensor counts of the global top-τ are known for any τ (SPT searches τ).

    Kept tensor by tensor, not as one flat sort: each tensor's entries are sorted once by int32 keys ordered as
    its scores (`selection.order_keys`; stable, so ties stay in index order), with that order. The threshold
    of a global top-τ is then a search over keys that asks each tensor how many of its keys lie below (a
    binary search in its sorted keys). That holds two int32 copies of the scores where one flat sort held a
    float copy, its int64 order and int64 owners: at SmolLM2's 106M entries 1.2 GB above the scores instead of
    2.8 GB, and 4 s instead of 62 (docs/benchmarks.md, `bench:select`)."""

    def __init__(self, scores: dict[str, torch.Tensor]) -> None:
        self.names = sorted(scores)
        self.keys: list[torch.Tensor] = []  # per tensor: its keys, ascending (best score first)
        self.order: list[torch.Tensor] = []  # per tensor: the flat index of each sorted key
        for name in self.names:
            keys, order = torch.sort(order_keys(scores[name], descending=True), stable=True)
            self.keys.append(keys)
            self.order.append(order.to(torch.int32))
        self.total = sum(k.numel() for k in self.keys)

    def _at_most(self, key: int, strictly_below: bool = False) -> list[int]:
        """Per tensor: how many of its keys are <= `key` (< with strictly_below)."""
        probe = torch.tensor([key], dtype=torch.int32)
        return [int(torch.searchsorted(k, probe, right=not strictly_below)) for k in self.keys]

    def _counts(self, tau: int) -> list[int]:
        if tau <= 0:
            return [0] * len(self.keys)
        if tau >= self.total:
            return [k.numel() for k in self.keys]
        lo, hi = -(2**31), 2**31 - 1  # the smallest key with at least tau entries at or below it
        while lo < hi:
            mid = (lo + hi) // 2
            if sum(self._at_most(mid)) >= tau:
                hi = mid
            else:
                lo = mid + 1
        below, upto = self._at_most(lo, strictly_below=True), self._at_most(lo)
        need, counts = tau - sum(below), []
        for b, u in zip(below, upto, strict=True):  # ties at the threshold: the earliest tensors' first
            take = min(u - b, need)
            need -= take
            counts.append(b + take)
        return counts

    def counts(self, tau: int) -> dict[str, int]:
        """Entries of each tensor among the global top-τ."""
        return dict(zip(self.names, self._counts(tau), strict=True))

    def next_entries(self, tau: int, caps: torch.Tensor, limit: int) -> dict[str, torch.Tensor]:
        """Up to `limit` entries ranked after the top-τ, at most caps[i] from tensor i, in rank order."""
        if limit <= 0:
            return {}
        keys, index, owner = [], [], []
        for i, (k, order, c) in enumerate(zip(self.keys, self.order, self._counts(tau), strict=True)):
            n = min(int(caps[i]), limit, k.numel() - c)  # a tensor's candidates: its next n in its own order
            if n > 0:
                keys.append(k[c:c + n])
                index.append(order[c:c + n])
                owner.append(torch.full((n,), i, dtype=torch.int32))
        if not keys:
            return {}
        # one stable sort by key of candidates laid out by tensor, then rank: ties by name, then index
        pick = torch.sort(torch.cat(keys), stable=True).indices[:limit]
        chosen, owners = torch.cat(index)[pick], torch.cat(owner)[pick]
        return {self.names[i]: chosen[owners == i].sort().values for i in torch.unique(owners).tolist()}

    def top(self, tau: int) -> dict[str, torch.Tensor]:
        """The global top-τ as sorted int32 flat indices per tensor (tensors with none left out)."""
        out = {}
        for name, order, c in zip(self.names, self.order, self._counts(tau), strict=True):
            if c:
                out[name] = order[:c].sort().values
        return out
