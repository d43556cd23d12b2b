"""The hard-concrete delta form of diff pruning's first phase (methods.md §1-2; Louizos et al. 2018).

    θ = θ0 + z ⊙ w          (U-diff)        θ = θ0 + z ⊙ z_g ⊙ w     (S-diff: z_g one gate per group)
    z = min(1, max(0, s·(r − l) + l)),  s = σ(log u − log(1 − u) + α),  u ~ U(0, 1)   (training)
    z = min(1, max(0, σ(α)·(r − l) + l))                                                (eval)
    E‖δ‖₀ = Σ σ(α − log(−l/r))

w is dense (init 0) and α per entry (init α0); θ0 is the frozen base parameter itself — no copy.
A fresh z is drawn for each forward in training, per module, so the full mask never exists at once.
Groups: one per tensor (the paper's S-diff), or blocks of `rows` consecutive rows of a matrix (a
head's rows for q/k/v when rows = head size) / entries of a vector.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

EPS = 1e-6


def gate(alpha: torch.Tensor, l: float, r: float, training: bool) -> torch.Tensor:  # noqa: E741
    """The hard-concrete gate z for logits α: a sample in training, the deterministic value in eval."""
    noise = torch.logit(torch.rand_like(alpha), EPS) if training else 0.0  # logit(u) = log u − log(1 − u)
    s = torch.sigmoid(alpha + noise)
    return (s * (r - l) + l).clamp(0.0, 1.0)


def p_nonzero(alpha: torch.Tensor, l: float, r: float) -> torch.Tensor:  # noqa: E741
    """P(z > 0) = σ(α − log(−l/r)): the expected-L0 contribution of each gate."""
    return torch.sigmoid(alpha - math.log(-l / r))


def log_p_nonzero(alpha: torch.Tensor, l: float, r: float) -> torch.Tensor:  # noqa: E741
    """log P(z > 0), computed in log space so that very negative α still order."""
    return F.logsigmoid(alpha - math.log(-l / r))


def group_index(shape: torch.Size, rows: int | None) -> tuple[torch.Tensor | None, int]:
    """Group id of every entry of a tensor (None: the whole tensor is one group) and the group count."""
    if rows is None:
        return None, 1
    n_rows = shape[0]
    ids = torch.arange(n_rows) // rows
    if len(shape) > 1:
        ids = ids.view(-1, *([1] * (len(shape) - 1))).expand(shape)
    return ids.reshape(-1), int(math.ceil(n_rows / rows))


class HardConcreteModule(nn.Module):
    """Wraps one module; each chosen tensor `t` gets `t_w` (dense diff), `t_alpha` (entry logits) and,
    when structured, `t_group_alpha` (one logit per group). Parameter names of the base stay as they are."""

    def __init__(self, base: nn.Module, names: list[str], alpha_init: float, l: float, r: float,  # noqa: E741
                 group_rows: int | None, structured: bool, group_penalty: str = "paper") -> None:
        super().__init__()
        object.__setattr__(self, "wrapped", base)
        for name, param in base.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, child in base.named_children():  # a module owning tensors and submodules (ViT embeddings)
            self.add_module(name, child)  # keeps its children's names and parameters in the model
        self.delta_names, self.l, self.r, self.structured = sorted(names), l, r, structured
        self.group_penalty = group_penalty
        for name in self.delta_names:
            base_param = getattr(base, name)
            self.register_parameter(f"{name}_w", nn.Parameter(torch.zeros_like(base_param)))
            self.register_parameter(f"{name}_alpha", nn.Parameter(torch.full_like(base_param, alpha_init)))
            if structured:
                ids, n_groups = group_index(base_param.shape, group_rows)
                if ids is not None:
                    self.register_buffer(f"{name}_group_ids", ids.to(base_param.device), persistent=False)
                self.register_parameter(f"{name}_group_alpha", nn.Parameter(
                    torch.full((n_groups,), alpha_init, device=base_param.device, dtype=base_param.dtype)))

    def group_ids(self, name: str) -> torch.Tensor | None:
        return getattr(self, f"{name}_group_ids", None)

    def mask(self, name: str, training: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
        """z (⊙ z_g) for tensor `name`, in its shape; only its rows `rows` when given."""
        alpha = getattr(self, f"{name}_alpha")
        ids = self.group_ids(name)
        if rows is not None:
            alpha = alpha[rows]
            ids = None if ids is None else ids.view(getattr(self, name).shape)[rows].reshape(-1)
        z = gate(alpha, self.l, self.r, training)
        if self.structured:
            zg = gate(getattr(self, f"{name}_group_alpha"), self.l, self.r, training)
            z = z * (zg.expand(alpha.numel()) if ids is None else zg[ids]).view_as(alpha)
        return z

    def delta(self, name: str, training: bool) -> torch.Tensor:
        return self.mask(name, training) * getattr(self, f"{name}_w")

    def expected_l0(self, name: str) -> torch.Tensor:
        """Σ_i P(z_i > 0) (· P(z_g(i) > 0) when structured): methods.md §1 and §2. With
        group_penalty="reference", the released code's form instead: Σ_i P(z_i > 0) + Σ_j P(z^j > 0),
        where a group logit's penalty gradient no longer scales with its group's size."""
        p = p_nonzero(getattr(self, f"{name}_alpha"), self.l, self.r)
        if not self.structured:
            return p.sum()
        pg = p_nonzero(getattr(self, f"{name}_group_alpha"), self.l, self.r)
        if self.group_penalty == "reference":
            return p.sum() + pg.sum()
        ids = self.group_ids(name)
        if ids is None:
            return p.sum() * pg[0]
        return (p.reshape(-1) * pg[ids]).sum()

    def log_keep(self, name: str) -> torch.Tensor:
        """log P(entry on) per entry of tensor `name`, in its shape: log σ(α − log(−l/r)), plus the group's
        term when structured. Phase 1's own ranking of entries."""
        alpha = getattr(self, f"{name}_alpha")
        out = log_p_nonzero(alpha, self.l, self.r)
        if self.structured:
            group = log_p_nonzero(getattr(self, f"{name}_group_alpha"), self.l, self.r)
            ids = self.group_ids(name)
            out = out + (group[0] if ids is None else group[ids].view_as(alpha))
        return out

    def forward(self, *args, **kwargs):
        base = self.wrapped
        if isinstance(base, nn.Embedding) and self.delta_names == ["weight"] and len(args) == 1 and not kwargs \
                and base.max_norm is None:
            return self._looked_up(args[0])
        tensors = {n: getattr(self, n) + self.delta(n, self.training) for n in self.delta_names}
        if isinstance(base, nn.Linear) and not kwargs and len(args) == 1:
            return F.linear(args[0], tensors.get("weight", self.weight), tensors.get("bias", self.bias))
        return functional_call(base, tensors, args, kwargs)

    def _looked_up(self, ids: torch.Tensor) -> torch.Tensor:
        """An embedding gates only the rows the batch looks up. Each row's gates are drawn independently,
        so this is the same distribution as gating the whole table, at a fraction of the cost: word
        embeddings are half of MiniLM's parameters (a fifth of BERT-base's) and a batch reads a few hundred
        of their 30k rows. The padding row still gets no gradient (as nn.Embedding's padding_idx)."""
        base = self.wrapped
        rows, where = torch.unique(ids, return_inverse=True)
        table = self.weight[rows] + self.mask("weight", self.training, rows) * self.weight_w[rows]
        padding = None
        if base.padding_idx is not None:
            hit = (rows == base.padding_idx).nonzero()
            padding = int(hit[0, 0]) if len(hit) else None
        return F.embedding(where, table, padding, None, 2.0, base.scale_grad_by_freq)

    def extra_repr(self) -> str:
        return f"{', '.join(self.delta_names)}: hard-concrete diff{' (structured)' if self.structured else ''}"
