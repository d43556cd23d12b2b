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
    """All entries of many tensors sorted once by score (descending; ties by name, then index), so the
    per-tensor counts of the global top-τ are a prefix count for any τ (SPT sweeps τ)."""

    def __init__(self, scores: dict[str, torch.Tensor]) -> None:
        self.names = sorted(scores)
        flat = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in self.names])
        self.order = torch.sort(-flat, stable=True).indices
        sizes = torch.tensor([scores[n].numel() for n in self.names])
        owner = torch.repeat_interleave(torch.arange(len(self.names)), sizes)
        self.owner = owner[self.order]
        self.offsets = torch.cumsum(sizes, 0) - sizes
        self.total = int(sizes.sum())

    def counts(self, tau: int) -> dict[str, int]:
        """Entries of each tensor among the global top-τ."""
        found = torch.bincount(self.owner[:tau], minlength=len(self.names))
        return dict(zip(self.names, found.tolist(), strict=True))

    def next_entries(self, tau: int, caps: torch.Tensor, limit: int) -> dict[str, torch.Tensor]:
        """Up to `limit` entries ranked after the top-τ, at most caps[i] from tensor i, in rank order."""
        if limit <= 0:
            return {}
        idx, own = self.order[tau:], self.owner[tau:]
        keep = caps[own] > 0
        idx, own = idx[keep], own[keep]
        by_owner, perm = torch.sort(own, stable=True)
        first = torch.searchsorted(by_owner, by_owner)
        rank = torch.empty_like(perm)
        rank[perm] = torch.arange(len(perm)) - first
        ok = rank < caps[own]
        idx, own = idx[ok][:limit], own[ok][:limit]
        out = {}
        for i in torch.unique(own).tolist():
            out[self.names[i]] = (idx[own == i] - self.offsets[i]).sort().values.to(torch.int32)
        return out

    def top(self, tau: int) -> dict[str, torch.Tensor]:
        """The global top-τ as sorted int32 flat indices per tensor (tensors with none left out)."""
        chosen, owner = self.order[:tau], self.owner[:tau]
        out = {}
        for i, name in enumerate(self.names):
            mine = chosen[owner == i] - self.offsets[i]
            if mine.numel():
                out[name] = mine.sort().values.to(torch.int32)
        return out
