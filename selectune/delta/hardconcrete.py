"""The hard-concrete delta form of diff pruning's first phase (Louizos et al. 2018; docs/methods.md, U-Diff-Pruning).

    θ = θ0 + z ⊙ w          (U-diff)        θ = θ0 + z ⊙ z_g ⊙ w     (S-diff: z_g one gate per group)
    z = min(1, max(0, s·(r − l) + l)),  s = σ(log u − log(1 − u) + α),  u ~ U(0, 1)   (training)
    z = min(1, max(0, σ(α)·(r − l) + l))                                                (eval)
    E‖δ‖₀ = Σ σ(α − log(−l/r))

w is dense (init 0) and α per entry (init α0); θ0 is the frozen base parameter itself — no copy.
A fresh z is drawn for each forward in training. Groups: one per tensor (the paper's S-diff), or blocks
of `rows` consecutive rows of a matrix (a head's rows for q/k/v when rows = head size) / entries of a vector.

Two paths compute the same thing. A module on its own gates its tensors one by one (`HardConcreteModule`:
~15-27 small ops per tensor). Inside a model, `FlatGates` gates every tensor of every module in one pass
per forward (one noise draw, one autograd Function with its backward written out, one penalty
reduction): on a GPU the per-tensor path is a launch storm of thousands of tiny kernels per step
(docs/benchmarks.md, "Selective steps shaped for a GPU"), while the flat pass costs about as many kernels as one tensor.
On a CPU at the recipes' batch of 8 the same pass is bound by its passes over memory and by the page faults of
fresh flat buffers: the pass writes into buffers kept from step to step (`Workspace`), computes the penalty's
gradient in the forward that computes its value, and penalises the vocabulary table with the rest
(docs/benchmarks.md, "Diff pruning's phase 1 at the recipes' batch").
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

EPS = 1e-6
log = logging.getLogger(__name__)


# An embedding with at least this many rows gates only the rows a batch looks up (`_looked_up`): worth its
# `torch.unique` (a host sync on a GPU) and ~15 ops only for vocabularies, of which a batch reads a few
# hundred of 30k rows. Smaller tables (positions, token types) are gated whole in the flat pass.
LOOKUP_MIN_ROWS = 4096


def gate(alpha: torch.Tensor, l: float, r: float, training: bool) -> torch.Tensor:  # noqa: E741
    """The hard-concrete gate z for logits α: a sample in training, the deterministic value in eval."""
    return stretched(alpha, torch.rand_like(alpha) if training else None, l, r)[0]


def stretched(alpha: torch.Tensor, u: torch.Tensor | None, l: float, r: float,  # noqa: E741
              work: Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, s) for logits α and uniform noise u (None: eval): s = σ(α + logit u), z = clamp(s·(r − l) + l, 0, 1).
    Elementwise, the one formula of both paths. u is overwritten (by s): each fresh flat buffer is an
    allocation, which on CPU costs page faults, more than the arithmetic; z goes into `work`'s buffer when given."""
    s = torch.sigmoid(alpha) if u is None else u.logit_(EPS).add_(alpha).sigmoid_()  # logit u = log u − log(1 − u)
    z = s.mul(r - l) if work is None else torch.mul(s, r - l, out=work.like("z", s))
    return z.add_(l).clamp_(0.0, 1.0), s


def stretched_grad(s: torch.Tensor, l: float, r: float,  # noqa: E741
                   work: Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, dz/dα) from s: dz/dα = s(1 − s)(r − l) where 0 ≤ s̄ ≤ 1 (inclusive, as torch.clamp's gradient).
    z and dz/dα are handed on (as gradients): `work`'s "dw" and "da" buffers when given."""
    if work is None:
        z = s.mul(r - l).add_(l)
        inside = z.ge(0.0).logical_and_(z.le(1.0))
        dz = torch.addcmul(s, s, s, value=-1)
    else:
        z = torch.mul(s, r - l, out=work.like("dw", s)).add_(l)
        inside = torch.ge(z, 0.0, out=work.like("inside", s, torch.bool))
        inside.logical_and_(torch.le(z, 1.0, out=work.like("below", s, torch.bool)))
        dz = torch.addcmul(s, s, s, value=-1, out=work.like("da", s))
    return z.clamp_(0.0, 1.0), dz.mul_(inside).mul_(r - l)


def _in_use(base: torch.Tensor) -> bool:
    """Whether anything but `base` itself holds its storage (a view handed out and still alive, a `.grad`
    adopted from one, a tensor saved by a graph not yet freed)."""
    return torch._C._storage_Use_Count(base.untyped_storage()._cdata) > _ALONE


class Workspace:
    """Flat buffers kept from one step to the next, by name. On CPU every fresh buffer of a flat pass's size
    (tens of MB, above glibc's mmap threshold) is mapped anew and page-faulted in as it is first written:
    on this project's 2-core machine a product into a fresh 11M-entry buffer costs many times the same product
    into a kept one (`scripts/bench/bench_flat_ops.py`, docs/benchmarks.md). Each buffer is a
    1-D tensor kept here and handed out only as views (no operation a GPU would launch, and each hand-out
    has its own autograd identity); it is handed out again only when no view of it is alive any more — not
    a tensor saved by a graph not yet freed, not a `.grad` adopted from it and still set — else a fresh one
    replaces it, so reuse can never overwrite a live value."""

    def __init__(self) -> None:
        self.bases: dict[str, torch.Tensor] = {}

    def get(self, key: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        base = self.bases.get(key)
        if base is None or base.numel() != numel or base.dtype != dtype or base.device != device or _in_use(base):
            self.bases[key] = base = torch.empty(numel, dtype=dtype, device=device)
        return base.view(shape)

    def like(self, key: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Buffer `key` shaped as `like` (its dtype unless given)."""
        return self.get(key, like.shape, like.dtype if dtype is None else dtype, like.device)

    def clear(self) -> None:
        self.bases.clear()


def _alone() -> int:
    t = torch.empty(1)
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


_ALONE = _alone()  # the count of a storage only its own tensor holds (the storage object asked adds its own)


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


def group_lengths(shape: torch.Size, rows: int | None) -> list[int]:
    """Entries per group of a tensor, in order (the groups of `group_index` are contiguous row blocks)."""
    numel = math.prod(shape)
    if rows is None:
        return [numel]
    per_row = numel // shape[0]
    full, rest = divmod(shape[0], rows)
    return [rows * per_row] * full + ([rest * per_row] if rest else [])


class HardConcreteModule(nn.Module):
    """Wraps one module; each chosen tensor `t` gets `t_w` (dense diff), `t_alpha` (entry logits) and,
    when structured, `t_group_alpha` (one logit per group). Parameter names of the base stay as they are."""

    def __init__(self, base: nn.Module, names: list[str], alpha_init: float, l: float, r: float,  # noqa: E741
                 group_rows: int | None, structured: bool, group_penalty: str) -> None:
        super().__init__()
        object.__setattr__(self, "wrapped", base)
        for name, param in base.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, child in base.named_children():  # a module owning tensors and submodules (ViT embeddings)
            self.add_module(name, child)  # keeps its children's names and parameters in the model
        self.delta_names, self.l, self.r, self.structured = sorted(names), l, r, structured
        self.group_penalty, self.group_rows = group_penalty, group_rows if structured else None
        self.flat_tensors: dict[str, torch.Tensor] = {}  # θ views a FlatGates pass handed this forward
        self.rows_work: Workspace | None = None  # a vocabulary table's row gradients go into these (FlatGates)
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

    @property
    def looks_up_rows(self) -> bool:
        """An embedding table large enough to gate only the rows a batch looks up (`_looked_up`)."""
        base = self.wrapped
        return (isinstance(base, nn.Embedding) and self.delta_names == ["weight"] and base.max_norm is None
                and base.num_embeddings >= LOOKUP_MIN_ROWS)

    def group_ids(self, name: str) -> torch.Tensor | None:
        return getattr(self, f"{name}_group_ids", None)

    def mask(self, name: str, training: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
        """z (⊙ z_g) for tensor `name`, in its shape; only its rows `rows` when given."""
        alpha = getattr(self, f"{name}_alpha")
        ids = self.group_ids(name)
        if rows is not None:
            alpha = _rows(alpha, rows, self.rows_work)
            ids = None if ids is None else ids.view(getattr(self, name).shape)[rows].reshape(-1)
        z = gate(alpha, self.l, self.r, training)
        if self.structured:
            zg = gate(getattr(self, f"{name}_group_alpha"), self.l, self.r, training)
            z = z * (zg.expand(alpha.numel()) if ids is None else zg[ids]).view_as(alpha)
        return z

    def delta(self, name: str, training: bool) -> torch.Tensor:
        return self.mask(name, training) * getattr(self, f"{name}_w")

    def expected_l0(self, name: str) -> torch.Tensor:
        """Σ_i P(z_i > 0) (· P(z_g(i) > 0) when structured): docs/methods.md, U- and S-Diff-Pruning. With
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
        tensors = self.flat_tensors  # inside a model's forward: this pass's θ (FlatGates)
        if not tensors:
            if isinstance(base, nn.Embedding) and self.delta_names == ["weight"] and len(args) == 1 \
                    and not kwargs and base.max_norm is None:
                return self._looked_up(args[0])
            tensors = {n: getattr(self, n) + self.delta(n, self.training) for n in self.delta_names}
        if isinstance(base, nn.Linear) and not kwargs and len(args) == 1:
            return F.linear(args[0], tensors.get("weight", self.weight), tensors.get("bias", base.bias))
        return functional_call(base, tensors, args, kwargs)

    def _looked_up(self, ids: torch.Tensor) -> torch.Tensor:
        """An embedding gates only the rows the batch looks up. Each row's gates are drawn independently,
        so this is the same distribution as gating the whole table, at a fraction of the cost: word
        embeddings are half of MiniLM's parameters (a fifth of BERT-base's) and a batch reads a few hundred
        of their 30k rows. The padding row still gets no gradient (as nn.Embedding's padding_idx): its δ
        enters detached, selected on the device, where locating the row for F.embedding would need nonzero()
        and int(), two host syncs. torch.unique is this path's one sync."""
        base = self.wrapped
        rows, where = torch.unique(ids, return_inverse=True)
        delta = self.mask("weight", self.training, rows) * _rows(self.weight_w, rows, self.rows_work)
        if base.padding_idx is not None:
            delta = torch.where((rows != base.padding_idx).unsqueeze(-1), delta, delta.detach())
        return F.embedding(where, self.weight[rows] + delta, None, None, 2.0, base.scale_grad_by_freq)

    def extra_repr(self) -> str:
        return f"{', '.join(self.delta_names)}: hard-concrete diff{' (structured)' if self.structured else ''}"


class _RowGather(torch.autograd.Function):
    """table[rows] whose backward scatters into a kept buffer (`Workspace`), zeroed, instead of a fresh zero
    table: the gradient of a vocabulary's w and α is dense (AdamW steps every row) but only `rows` are
    nonzero, and a fresh table-sized buffer each step costs its page faults. `rows` are unique (torch.unique),
    so index_add_ writes each row once: the same values as indexing's own backward."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, rows: torch.Tensor, work: Workspace) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.work, ctx.key, ctx.meta = work, f"rows:{id(table)}", (table.shape, table.dtype, table.device)
        return table[rows]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        out = ctx.work.get(ctx.key, *ctx.meta).zero_()
        return out.index_add_(0, rows, grad), None, None


def _rows(table: torch.Tensor, rows: torch.Tensor, work: Workspace | None) -> torch.Tensor:
    """table[rows], the backward into `work` when given (and gradients are being recorded)."""
    if work is None or not (torch.is_grad_enabled() and table.requires_grad):
        return table[rows]
    return _RowGather.apply(table, rows, work)


# ---------------------------------------------------------------------------- the flat pass
def _scale_blocks(flat: torch.Tensor, per_block: torch.Tensor) -> torch.Tensor:
    """flat ⊙ (a value per block of entries, shape (blocks, 1)), in place and by broadcasting: the per-entry
    repetition of the group gates is never materialised."""
    flat.view(per_block.shape[0], -1).mul_(per_block)
    return flat


def _flat_forward(theta0: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, u: torch.Tensor | None,
                  zg: torch.Tensor | None, l: float, r: float,  # noqa: E741
                  work: Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """θ = θ0 + z ⊙ z_g ⊙ w over the flat buffers (zg: group gates per block, `FlatGates.repeat`; None
    unstructured), and the s the backward needs. Elementwise only, so `torch.compile` can fuse it into one
    kernel; eager, every buffer comes from `work` when given (θ included)."""
    z, s = stretched(alpha, u, l, r, work)
    if zg is not None:
        _scale_blocks(z, zg)
    return (torch.addcmul(theta0, z, w) if work is None else torch.addcmul(theta0, z, w, out=work.like("theta", z))), s


def _flat_backward(g: torch.Tensor, w: torch.Tensor, s: torch.Tensor, zg: torch.Tensor | None,
                   acc: torch.Tensor | None, l: float, r: float,  # noqa: E741
                   work: Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The chain rule of `_flat_forward` written out (the reference code's manual backward): from g = dL/dθ,
    dw = g·z·z_g, dα = g·w·z_g·dz/dα with dz/dα = s(1 − s)(r − l) where 0 ≤ s̄ ≤ 1 (torch.clamp's
    inclusive rule), and g·w·z, which each group's logit sums (None unstructured). `acc`: the penalty's
    gradient for these entries, already scaled (None: no penalty); dα is accumulated into it in place, so the
    penalty costs no pass and no buffer of its own here (the sum may round differently in the last bit from
    adding the penalty last, as before). In place on its own temporaries and `acc` only."""
    z, dz = stretched_grad(s, l, r, work)
    gw = g * w if work is None else torch.mul(g, w, out=work.like("gw", g))
    gwz = None
    if zg is not None:
        gwz = gw * z if work is None else torch.mul(gw, z, out=work.like("gwz", g))
        _scale_blocks(z, zg)
        _scale_blocks(gw, zg)
    dw = z.mul_(g)
    da = dz.mul_(gw) if acc is None else acc.addcmul_(dz, gw)
    return dw, da, gwz


def _penalty_terms(alpha: torch.Tensor, c: float, block: int = 0,
                   work: Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The expected-L0 terms p = σ(α − c) in one pass, for the forward: (Σ p, or its sums over blocks of
    `block` entries when block > 0; dp/dα = p(1 − p)), dp in p's own buffer. The backward then needs no
    σ of its own: the penalty's gradient is computed once, from the values the forward already has."""
    p = (alpha - c if work is None else torch.sub(alpha, c, out=work.like("p", alpha))).sigmoid_()
    sums = p.sum() if block == 0 else p.view(-1, block).sum(1)
    return sums, p.addcmul_(p, p, value=-1)


def _compiled(fn: Callable) -> Callable:
    """`fn` under torch.compile (fullgraph, fixed shapes), falling back to eager for the rest of the run if
    compiling fails: the compiled and eager functions compute the same thing, so a run should not die of it."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    current = [compiled]

    def call(*args):
        try:
            return current[0](*args)
        except Exception as err:  # inductor's failures have no common type
            if current[0] is fn:
                raise
            log.warning("torch.compile of %s failed (%s): running it eagerly", fn.__name__,
                        str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
            current[0] = fn
            return fn(*args)

    return call


class _FlatGate(torch.autograd.Function):
    """(θ_flat, E‖δ‖₀) for every tensor of a `FlatGates`, from the per-tensor parameters: one Function so
    that autograd sees a single node, and the backward returns each parameter's gradient as a view of one
    flat buffer (AccumulateGrad adopts it as `.grad` without a copy). The parameters are read through the
    flat buffers they are views of (`FlatGates.bind`), so nothing is concatenated. Saved: s (one flat buffer
    over the gated entries) and, when the penalty is computed, dp/dα (over every penalised entry, the
    vocabulary's included), which the backward scales in place into dα: a second backward of the same
    graph would find it changed, and autograd's version check refuses it."""

    @staticmethod
    def forward(ctx, gates: FlatGates, u: torch.Tensor | None, penalty: bool, *params: torch.Tensor):
        group_alpha = gates.unpack(params)[3]
        theta0, w, a = gates.flats
        n = gates.n
        ga = zg_rep = sg = None
        if gates.structured:
            ga = torch.cat(group_alpha)
            zg, sg = stretched(ga[:gates.gated_groups], None if u is None else u[n:], gates.l, gates.r)
            zg_rep = gates.repeat(zg)
        theta, s = gates.math[0](theta0, w, a[:n], None if u is None else u[:n], zg_rep, gates.l, gates.r,
                                 gates.eager_work)
        l0, saved = gates.penalty_forward(a, ga) if penalty else (a.new_zeros(()), ())
        ctx.gates, ctx.penalty = gates, penalty
        ctx.save_for_backward(s, sg, *saved)
        return (*gates.per_tensor(theta), l0)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        gates: FlatGates = ctx.gates
        s, sg, *saved = ctx.saved_tensors
        n = gates.n
        _, w, _ = gates.flats
        g, g_l0 = gates.gathered(grads[:-1], s, gates.eager_work), grads[-1]
        zg_rep = dzg = None
        if gates.structured:
            zg, dzg = stretched_grad(sg, gates.l, gates.r)
            zg_rep = gates.repeat(zg)
        acc = dga = None  # the penalty's gradient over every penalised entry (group), scaled by dL/dE‖δ‖₀
        if ctx.penalty and g_l0 is not None:
            acc = saved[0]
            if gates.structured:
                pg = saved[1]
                dga = torch.addcmul(pg, pg, pg, value=-1)
                if gates.group_penalty == "paper":  # Σ_j P_j Σ_{i∈j} p_i
                    acc = _scale_blocks(acc, gates.repeat(pg, every=True))
                    dga = dga.mul_(saved[2])
                dga = dga.mul_(g_l0)
            acc = acc.mul_(g_l0)
        dw, da, gwz = gates.math[1](g, w, s, zg_rep, None if acc is None else acc[:n], gates.l, gates.r,
                                    gates.eager_work)
        if gwz is not None:
            gate_part = gates.segment_sum(gwz).mul_(dzg)
            dga = gate_part if dga is None else _add_front(dga, gate_part)
        del zg_rep, gwz  # flat buffers: free them before the gradients are handed on
        unused = [None] * (len(gates.penalized) - len(gates.entries))
        grads = list(gates.per_tensor(dw))
        grads += gates.per_tensor(acc, every=True) if acc is not None else gates.per_tensor(da) + unused
        if gates.structured:
            grads += list(dga.split(gates.all_group_counts)) if acc is not None else \
                list(dga.split(gates.group_counts)) + unused
        return (None, None, None, *([None] * len(gates.entries)), *grads)


def _add_front(total: torch.Tensor, front: torch.Tensor) -> torch.Tensor:
    """total[:len(front)] += front, in place: the gated groups come first in every group-ordered vector."""
    total[:front.numel()].add_(front)
    return total


class FlatGates:
    """Gates every tensor of the given hard-concrete modules in one pass per forward of the model.

    `materialize` (a forward pre-hook on the model) reads θ0, w and α of all tensors as one flat buffer each
    (the per-tensor parameters are views of them: `bind`), draws ONE `torch.rand` for all of them, computes
    θ = θ0 + z ⊙ w and E‖δ‖₀ in `_FlatGate`, and hands each module views of θ (`flat_tensors`); `clear` (a
    forward hook) drops them. The parameters stay per tensor, so names, optimiser groups and checkpoints
    do not change. S-Diff groups (one per tensor or `group_rows` row blocks) are contiguous segments of the
    flat buffer: z_g is repeated per entry with a known output size, and a group's gradient is a segment
    sum, both without a host sync.
    Embeddings of at least LOOKUP_MIN_ROWS rows (`lookups`) keep their looked-up-rows path for the gates,
    but their logits are penalised here with the rest: their α (and group α) sit at the end of the flat α
    buffer, so E‖δ‖₀ and its gradient over the whole vocabulary are one pass with the others', not a
    separate autograd chain of ~6 passes over the table every step (`penalized` = `entries` + theirs)."""

    def __init__(self, modules: list[HardConcreteModule], compile_mode: str = "false") -> None:
        self.modules = [m for m in modules if not m.looks_up_rows]
        self.lookups = [m for m in modules if m.looks_up_rows] if self.modules else []
        self.entries = [(m, n) for m in self.modules for n in m.delta_names]
        self.penalized = self.entries + [(m, n) for m in self.lookups for n in m.delta_names]
        first = self.modules[0] if self.modules else None
        self.l, self.r = (first.l, first.r) if first else (-1.5, 1.5)
        self.c = math.log(-self.l / self.r)
        self.structured = bool(first and first.structured)
        self.group_penalty = first.group_penalty if first else "reference"
        self.all_shapes = [getattr(m, n).shape for m, n in self.penalized]
        self.all_sizes = [math.prod(shape) for shape in self.all_shapes]
        self.shapes, self.sizes = self.all_shapes[:len(self.entries)], self.all_sizes[:len(self.entries)]
        self.n, self.n_all = sum(self.sizes), sum(self.all_sizes)
        self.all_group_counts = [getattr(m, f"{n}_group_alpha").numel() for m, n in self.penalized] \
            if self.structured else []
        self.group_counts = self.all_group_counts[:len(self.entries)]
        self.gated_groups = sum(self.group_counts)
        self.group_lengths = [length for (m, n), shape in zip(self.penalized, self.all_shapes, strict=True)
                              for length in group_lengths(shape, m.group_rows)] if self.structured else []
        self.block = math.gcd(*self.group_lengths) if self.group_lengths else 1
        self.compile_mode = compile_mode
        self._lengths: dict[torch.device, torch.Tensor] = {}
        self._math: tuple[Callable, Callable, Callable] | None = None
        self.compiled = False
        self.work = Workspace()
        for module in self.lookups:
            module.rows_work = self.work
        self.l0: torch.Tensor | None = None
        self.flats: tuple[torch.Tensor, ...] = ()
        self.offsets = [sum(self.all_sizes[:i]) for i in range(len(self.all_sizes))]
        self.bind()

    @property
    def penalized_modules(self) -> list[HardConcreteModule]:
        """The modules whose E‖δ‖₀ this pass computes: the gated ones and the vocabulary tables."""
        return self.modules + self.lookups

    # ---------------------------------------------------------------- flat storage
    KINDS = ("", "_w", "_alpha")  # θ0, w, α (α: every penalised tensor; θ0 and w: the gated ones)

    def _kind_entries(self, kind: str) -> list[tuple[HardConcreteModule, str]]:
        return self.penalized if kind == "_alpha" else self.entries

    def bind(self) -> None:
        """Make θ0, w and α of every tensor views of one flat buffer each (FSDP's FlatParameter idea): the
        pass then reads them without concatenating (3 flat copies per forward, 2 per backward, and their
        memory). The Parameters stay the same objects (only `.data` moves), so optimisers, checkpoints and
        names are untouched. Called again whenever something (`.to()`, `load_state_dict(assign=True)`)
        gave a parameter storage of its own: `bound` checks that before every pass."""
        if not self.entries or self.bound():
            return
        flats = []
        with torch.no_grad():
            for kind in self.KINDS:
                entries = self._kind_entries(kind)
                params = [getattr(m, f"{n}{kind}") for m, n in entries]
                flat = torch.cat([p.detach().reshape(-1) for p in params])
                sizes, shapes = self.all_sizes[:len(entries)], self.all_shapes[:len(entries)]
                for p, part, shape in zip(params, flat.split(sizes), shapes, strict=True):
                    p.data = part.view(shape)
                flats.append(flat)
        self.flats = tuple(flats)

    def bound(self) -> bool:
        if not self.flats:
            return False
        for kind, flat in zip(self.KINDS, self.flats, strict=True):
            base, size = flat.data_ptr(), flat.element_size()
            for (m, n), offset in zip(self._kind_entries(kind), self.offsets, strict=False):
                p = getattr(m, f"{n}{kind}")
                if p.data_ptr() != base + offset * size or p.dtype != flat.dtype or not p.is_contiguous():
                    return False
        return True

    # ---------------------------------------------------------------- called from _FlatGate
    def unpack(self, params: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], ...]:
        count, every = len(self.entries), len(self.penalized)
        return (params[:count], params[count:2 * count], params[2 * count:2 * count + every],
                params[2 * count + every:])

    def lengths(self, device: torch.device) -> torch.Tensor:
        """The groups' lengths in blocks of `block` entries, on `device` (made once per device): every
        penalised tensor's groups, the gated ones first."""
        if device not in self._lengths:
            blocks = [length // self.block for length in self.group_lengths]
            self._lengths[device] = torch.tensor(blocks, dtype=torch.long, device=device)
        return self._lengths[device]

    def repeat(self, per_group: torch.Tensor, every: bool = False) -> torch.Tensor:
        """A per-group value repeated over its blocks of `block` entries, shape (blocks, 1), for
        `_scale_blocks` (output_size given: no host sync on a GPU): over the gated entries, or over every
        penalised entry (`every`)."""
        lengths = self.lengths(per_group.device)
        lengths = lengths if every else lengths[:self.gated_groups]
        size = (self.n_all if every else self.n) // self.block
        return per_group.repeat_interleave(lengths, output_size=size).unsqueeze(1)

    def segment_sum(self, flat: torch.Tensor, every: bool = False) -> torch.Tensor:
        """Σ over each group's entries (of the gated entries, or of every penalised one). `unsafe` skips
        the length check (two host syncs); the lengths are ours. The CPU kernel adds one entry after another
        in the input's dtype (float32 loses ~1% over a 2M-entry group of values near 1), so blocks of `block`
        entries (the gcd of the group lengths: 384 for MiniLM's tensors, 32 for 32-row groups) are summed
        first by torch.sum, pairwise."""
        blocks = flat.view(-1, self.block).sum(1) if self.block > 1 else flat
        return self._segments(blocks, every)

    def _segments(self, blocks: torch.Tensor, every: bool) -> torch.Tensor:
        lengths = self.lengths(blocks.device)
        lengths = lengths if every else lengths[:self.gated_groups]
        return torch.segment_reduce(blocks, "sum", lengths=lengths, unsafe=True)

    def penalty_forward(self, alpha: torch.Tensor, group_alpha: torch.Tensor | None
                        ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """E‖δ‖₀ of every penalised tensor, in the form each module's `expected_l0` uses (docs/methods.md,
        diff pruning), and what its gradient needs, computed in the same pass: dp/dα over the flat α
        buffer (in p's own buffer), and for S-Diff P(z^j > 0) per group and, in the paper's form, each
        group's Σ_i p_i."""
        paper = self.structured and self.group_penalty == "paper"
        sums, dp = self.math[2](alpha, self.c, self.block if paper else 0, self.eager_work)
        if group_alpha is None:
            return sums, (dp,)
        pg = (group_alpha - self.c).sigmoid_()
        if not paper:
            return sums + pg.sum(), (dp, pg)
        per_group = self._segments(sums, every=True)
        return (per_group * pg).sum(), (dp, pg, per_group)

    def gathered(self, grads: tuple[torch.Tensor | None, ...], like: torch.Tensor,
                 work: Workspace | None) -> torch.Tensor:
        """dL/dθ of every gated tensor as one flat buffer (zeros where a tensor got none), copied into
        `work`'s buffer: θ is handed out as one output per tensor so that autograd does not gather their
        gradients itself (a split's backward concatenates them into a fresh flat buffer every step)."""
        parts = [like.new_zeros(size) if grad is None else grad.reshape(-1)
                 for grad, size in zip(grads, self.sizes, strict=True)]
        return torch.cat(parts) if work is None else torch.cat(parts, out=work.like("g", like))

    def per_tensor(self, flat: torch.Tensor, every: bool = False) -> list[torch.Tensor]:
        count = len(self.penalized if every else self.entries)
        sizes, shapes = self.all_sizes[:count], self.all_shapes[:count]
        return [part.view(shape) for part, shape in zip(flat.split(sizes), shapes, strict=True)]

    @property
    def math(self) -> tuple[Callable, Callable, Callable]:
        """The elementwise forward, backward and penalty terms: compiled (one fused kernel each) when
        method.compile says so, else eager. torch.rand stays outside, so both see the same noise."""
        if self._math is None:
            module, name = self.entries[0]
            device = getattr(module, f"{name}_w").device
            triton = importlib.util.find_spec("triton") is not None
            compiled = self.compile_mode == "true" or (self.compile_mode == "auto" and device.type == "cuda" and triton)
            fns = (_flat_forward, _flat_backward, _penalty_terms)
            self._math = tuple(_compiled(f) for f in fns) if compiled else fns
            self.compiled = compiled
        return self._math

    @property
    def eager_work(self) -> Workspace | None:
        """The buffers the eager math writes into; None when compiled (inductor plans its own)."""
        return None if self.math and self.compiled else self.work

    # ---------------------------------------------------------------- per forward
    def materialize(self, training: bool) -> None:
        """Gate every tensor at once and hand each module its views of θ (a sample in training, the
        deterministic gates in eval). The expected L0 of this forward is kept for `take_l0`."""
        if not self.entries:
            return
        self.bind()
        params = [getattr(m, n) for m, n in self.entries]
        params += [getattr(m, f"{n}_w") for m, n in self.entries]
        params += [getattr(m, f"{n}_alpha") for m, n in self.penalized]
        if self.structured:
            params += [getattr(m, f"{n}_group_alpha") for m, n in self.penalized]
        alpha = params[2 * len(self.entries)]
        u = None  # the same stream as torch.rand(n + groups), drawn into a kept buffer (`Workspace`)
        if training:
            u = self.work.get("u", (self.n + self.gated_groups,), alpha.dtype, alpha.device).uniform_()
        penalty = training and torch.is_grad_enabled()
        *thetas, l0 = _FlatGate.apply(self, u, penalty, *params)
        self.l0 = l0 if penalty else None
        for (module, name), view in zip(self.entries, thetas, strict=True):
            module.flat_tensors[name] = view

    def take_l0(self) -> torch.Tensor | None:
        """E‖δ‖₀ of every penalised tensor from the last training forward (once: None after that)."""
        l0, self.l0 = self.l0, None
        return l0

    def clear(self) -> None:
        for module in self.modules:
            module.flat_tensors.clear()

    def pre_hook(self, model: nn.Module, args: tuple) -> None:
        self.materialize(model.training)

    def post_hook(self, model: nn.Module, args: tuple, output) -> None:
        self.clear()
