"""Diff pruning's flat phase-1 pass (FlatGates) against the per-tensor computation it replaces."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from selectune.delta.hardconcrete import EPS, LOOKUP_MIN_ROWS, FlatGates, HardConcreteModule

L, R = -1.5, 1.5
VARIANTS = [(False, None, "reference"), (True, None, "reference"), (True, None, "paper"),
            (True, 3, "reference"), (True, 3, "paper")]


def gated_modules(structured: bool, group_rows: int | None, penalty: str) -> list[HardConcreteModule]:
    """Matrices, biases, a LayerNorm and a small embedding (gated whole), float64, random logits and diffs
    so that some gates sit at 0 or 1 (clamped) and some in between."""
    torch.manual_seed(0)
    bases = [nn.Linear(5, 7), nn.LayerNorm(7), nn.Embedding(10, 4, padding_idx=0), nn.Linear(7, 2)]
    modules = []
    for base in bases:
        base = base.double().requires_grad_(False)
        names = [n for n, _ in base.named_parameters()]
        module = HardConcreteModule(base, names, 5.0, L, R, group_rows, structured, penalty)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.endswith(("_w", "alpha")):
                    p.normal_(0, 2)
        modules.append(module)
    return modules


def per_tensor_reference(gates: FlatGates, u: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """θ of every tensor and E‖δ‖₀, tensor by tensor with autograd, from the same noise u (the flat pass's
    order: every entry's own noise, then every tensor's group noise): the computation before the flat pass."""
    thetas, n, g = [], 0, gates.n
    for module, name in gates.entries:
        alpha, w = getattr(module, f"{name}_alpha"), getattr(module, f"{name}_w")
        noise = 0.0 if u is None else torch.logit(u[n:n + alpha.numel()].view_as(alpha), EPS)
        n += alpha.numel()
        z = (torch.sigmoid(alpha + noise) * (R - L) + L).clamp(0, 1)
        if module.structured:
            group_alpha = getattr(module, f"{name}_group_alpha")
            noise = 0.0 if u is None else torch.logit(u[g:g + group_alpha.numel()], EPS)
            g += group_alpha.numel()
            zg = (torch.sigmoid(group_alpha + noise) * (R - L) + L).clamp(0, 1)
            ids = module.group_ids(name)
            z = z * (zg.expand(alpha.numel()) if ids is None else zg[ids]).view_as(alpha)
        thetas.append(getattr(module, name) + z * w)
    l0 = sum(module.expected_l0(name) for module, name in gates.entries)
    return thetas, l0


def trainables(modules: list[HardConcreteModule]) -> list[torch.Tensor]:
    return [p for m in modules for n, p in m.named_parameters() if n.endswith(("_w", "alpha"))]


@pytest.mark.parametrize("structured,group_rows,penalty", VARIANTS)
def test_flat_pass_equals_the_per_tensor_computation_values_penalty_and_every_gradient(structured, group_rows,
                                                                                        penalty):
    modules = gated_modules(structured, group_rows, penalty)
    gates = FlatGates(modules)
    assert len(gates.entries) == 7 and gates.n == sum(p.numel() for m in modules for p in m.parameters(False)
                                                      if p.requires_grad is False)
    torch.manual_seed(5)
    gates.materialize(training=True)
    flat = [m.flat_tensors[n] for m, n in gates.entries]
    l0 = gates.take_l0()
    torch.manual_seed(5)  # the pass draws one torch.rand over entries and groups: redraw it for the reference
    u = torch.rand(gates.n + sum(gates.group_counts), dtype=torch.float64)
    expected, expected_l0 = per_tensor_reference(gates, u)
    for got, want in zip(flat, expected, strict=True):
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(l0, expected_l0, rtol=1e-12)
    weights = [torch.randn_like(t) for t in expected]  # an arbitrary loss of θ, plus the penalty
    params = trainables(modules)

    def loss(thetas, penalty_term):
        return sum((t * k).sum() for t, k in zip(thetas, weights, strict=True)) + 0.3 * penalty_term

    got = torch.autograd.grad(loss(flat, l0), params)
    want = torch.autograd.grad(loss(expected, expected_l0), params)
    for g, w, p in zip(got, want, params, strict=True):
        assert g.shape == p.shape and torch.allclose(g, w, rtol=1e-10, atol=1e-12)
    assert any((g != 0).any() for g in got)


@pytest.mark.parametrize("structured,group_rows,penalty", VARIANTS)
def test_eval_gates_are_the_deterministic_per_tensor_ones(structured, group_rows, penalty):
    modules = gated_modules(structured, group_rows, penalty)
    gates = FlatGates(modules)
    state = torch.get_rng_state()
    with torch.no_grad():
        gates.materialize(training=False)
    assert torch.equal(torch.get_rng_state(), state) and gates.take_l0() is None  # no noise, no penalty
    for module, name in gates.entries:
        want = getattr(module, name) + module.delta(name, training=False)
        assert torch.allclose(module.flat_tensors[name], want, rtol=1e-14, atol=1e-14)
    gates.clear()
    assert all(not m.flat_tensors for m in modules)


def test_gradients_arrive_only_through_the_flat_pass_and_the_unused_penalty_is_skipped():
    """The penalty left out of the loss (no gradient for E‖δ‖₀) and a tensor not used downstream: the
    Function's backward still runs, with zero gradient where nothing flowed."""
    modules = gated_modules(True, 3, "paper")
    gates = FlatGates(modules)
    gates.materialize(training=True)
    first = gates.entries[0]
    first[0].flat_tensors[first[1]].sum().backward()
    grads = [getattr(m, f"{n}_w").grad for m, n in gates.entries]
    assert grads[0].abs().sum() > 0 and all((g == 0).all() for g in grads[1:])


@pytest.mark.parametrize("structured,group_rows,penalty", VARIANTS)
def test_a_vocabulary_table_is_penalised_in_the_pass_with_the_per_tensor_values_and_gradients(structured, group_rows,
                                                                                                penalty):
    """A vocabulary-sized embedding gates its looked-up rows itself, but its E‖δ‖₀ (every row's) is part of the
    pass: the penalty and every gradient (its α gets the rows' gate gradient and the whole table's penalty
    gradient, in one flat buffer) equal the per-tensor computation's, float64."""
    modules = gated_modules(structured, group_rows, penalty)
    table = nn.Embedding(LOOKUP_MIN_ROWS, 2, padding_idx=1).double().requires_grad_(False)
    vocab = HardConcreteModule(table, ["weight"], 5.0, L, R, group_rows, structured, penalty)
    with torch.no_grad():
        for name, p in vocab.named_parameters():
            if name.endswith(("_w", "alpha")):
                p.normal_(0, 2)
    gates = FlatGates([*modules, vocab])
    assert gates.lookups == [vocab] and vocab.weight_alpha.data_ptr() == gates.flats[2][gates.n:].data_ptr()
    ids = torch.tensor([[3, 1, 7, 3], [LOOKUP_MIN_ROWS - 1, 0, 2, 7]])
    torch.manual_seed(5)
    gates.materialize(training=True)
    flat, l0 = [m.flat_tensors[n] for m, n in gates.entries], gates.take_l0()
    torch.manual_seed(6)
    rows = vocab(ids)
    torch.manual_seed(5)
    u = torch.rand(gates.n + sum(gates.group_counts), dtype=torch.float64)
    expected, _ = per_tensor_reference(gates, u)
    expected_l0 = sum(m.expected_l0(n) for m in [*modules, vocab] for n in m.delta_names)
    torch.manual_seed(6)
    vocab.rows_work, work = None, vocab.rows_work  # the reference: plain indexing's backward
    expected_rows = vocab(ids)
    vocab.rows_work = work
    assert torch.allclose(l0, expected_l0, rtol=1e-12) and torch.equal(rows, expected_rows)
    weights = [torch.randn_like(t) for t in [*expected, rows]]
    params = trainables([*modules, vocab])

    def loss(thetas, penalty_term):
        return sum((t * k).sum() for t, k in zip(thetas, weights, strict=True)) + 0.3 * penalty_term

    got = torch.autograd.grad(loss([*flat, rows], l0), params)
    want = torch.autograd.grad(loss([*expected, expected_rows], expected_l0), params)
    for g, w, p in zip(got, want, params, strict=True):
        assert g.shape == p.shape and torch.allclose(g, w, rtol=1e-10, atol=1e-12)
    table_alpha = next(g for g, p in zip(got, params, strict=True) if p is vocab.weight_alpha)
    assert (table_alpha[100:] != 0).all()  # rows never looked up: the penalty's gradient still reaches them


def test_a_vocabulary_sized_embedding_keeps_its_looked_up_path():
    small = HardConcreteModule(nn.Embedding(LOOKUP_MIN_ROWS - 1, 2), ["weight"], 5.0, L, R, None, False, "paper")
    large = HardConcreteModule(nn.Embedding(LOOKUP_MIN_ROWS, 2), ["weight"], 5.0, L, R, None, False, "paper")
    gates = FlatGates([small, large])
    assert gates.modules == [small] and gates.n == (LOOKUP_MIN_ROWS - 1) * 2


def test_group_lengths_are_the_row_blocks_of_group_index():
    from selectune.delta.hardconcrete import group_index, group_lengths

    for shape, rows in [((7, 5), 3), ((6, 4), 3), ((10,), 4), ((7, 5), None)]:
        ids, count = group_index(torch.Size(shape), rows)
        lengths = group_lengths(torch.Size(shape), rows)
        assert len(lengths) == count and sum(lengths) == math.prod(shape)
        if ids is not None:
            assert torch.equal(torch.bincount(ids), torch.tensor(lengths))


@pytest.mark.parametrize("method", ["udiff", "sdiff"])
def test_a_model_forward_uses_the_flat_pass_and_equals_the_per_tensor_path_in_eval(method, data_env):
    """Inside a model the hooks gate every tensor in one pass (the vocabulary table excepted); the output
    equals the per-tensor path's. Training: the penalty comes from the pass, once per forward."""
    from selectune.commands import RunSpec, build
    from selectune.tasks import load_task

    from conftest import compose_run

    spec = RunSpec.from_config(compose_run(f"glue/rte_{method}", "method.group_rows=4"))
    backbone, diff = build(spec, load_task(spec.task))
    diff.attach(backbone)
    with torch.no_grad():
        for name, p in backbone.model.named_parameters():
            if name.endswith(("_w", "alpha")):
                p.normal_(0, 2)
    model = backbone.model.eval()
    batch = {"input_ids": torch.tensor([[101, 2000, 2001, 102, 0]]), "attention_mask": torch.tensor([[1] * 4 + [0]])}
    with torch.no_grad():
        flat = model(**batch).logits
        for hook in diff.hooks:
            hook.remove()
        per_tensor = model(**batch).logits
    assert torch.allclose(flat, per_tensor, atol=1e-6)
    diff.hooks = [model.register_forward_pre_hook(diff.flat.pre_hook),
                  model.register_forward_hook(diff.flat.post_hook, always_call=True)]
    looked_up = [m for m in diff.hardconcrete.values() if m not in diff.flat.modules]
    assert [m.wrapped.num_embeddings for m in looked_up] == [backbone.model.config.vocab_size]
    model.train()
    model(**batch).logits.sum().backward()
    penalty = diff.penalty()
    assert torch.allclose(penalty, diff.cfg.l0_weight * diff.expected_l0(), rtol=1e-5)
    assert diff.flat.take_l0() is None  # taken once
    assert all(not m.flat_tensors for m in diff.hardconcrete.values())  # views dropped after the forward


def test_phase1_resumed_after_a_kill_is_bit_identical(data_env, tmp_path, monkeypatch):
    """The flat pass draws its noise from the default generator the checkpoint saves: a run killed in phase 1
    and resumed ends with the same delta, bit for bit, as one never stopped.

    The three runs use MKL's conditional numerical reproducibility (MKL_CBWR=COMPATIBLE): with the default
    code path, MKL picked another summation order in 4 of 25 otherwise identical processes here (the same
    47 of 119 tensors off by 1e-7..1.5e-6 after two steps), which failed this test about once in five
    suite runs; with COMPATIBLE, 25 of 25 agreed. That variation is the library's, between any two
    processes, resumed or not; what this test checks is selectune's part: RNG streams, data order, state."""
    from selectune.delta.taskdelta import TaskDelta

    from conftest import TINY, whole_and_resumed

    args = ["train", "recipe=glue/rte_sdiff", *TINY, "trainer.epochs=2", "method.phase1_epochs=1",
            "method.group_rows=4", "method.l0_weight=1e-4", "trainer.lr=1e-2", "trainer.eval_every=12",
            "trainer.checkpoint_every=2"]
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")  # inherited by all three processes
    a, b = whole_and_resumed(args, tmp_path)
    assert a["evals"] == b["evals"] and a["method_state"]["mask_hash"] == b["method_state"]["mask_hash"]
    da, db = TaskDelta.load(tmp_path / "whole").tensors, TaskDelta.load(tmp_path / "killed").tensors
    differ = [(k, float((da[k] - db[k]).abs().max())) for k in da if not torch.equal(da[k], db[k])]
    assert da.keys() == db.keys() and not differ, differ[:5]


def test_parameters_are_views_of_flat_buffers_and_a_moved_model_is_bound_again():
    """θ0, w and α live in one flat buffer each, so the pass concatenates nothing; their gradients arrive as
    views of one flat gradient. Whatever gives a parameter its own storage (here `.double()` of a float32
    module) is noticed before the next pass, which binds again and computes the same values."""
    modules = gated_modules(False, None, "reference")
    for m in modules:
        m.float()
    gates = FlatGates(modules)
    assert gates.bound()
    w = [getattr(m, f"{n}_w") for m, n in gates.entries]
    assert all(p.untyped_storage().data_ptr() == gates.flats[1].untyped_storage().data_ptr() for p in w)
    gates.materialize(training=True)
    sum(m.flat_tensors[n].sum() for m, n in gates.entries).backward()
    assert len({p.grad.untyped_storage().data_ptr() for p in w}) == 1  # adopted as views, not copied
    gates.clear()
    for m in modules:
        m.double()
    assert not gates.bound()
    with torch.no_grad():
        gates.materialize(training=False)
    assert gates.bound() and gates.flats[0].dtype == torch.float64
    for module, name in gates.entries:
        want = getattr(module, name) + module.delta(name, training=False)
        assert torch.allclose(module.flat_tensors[name], want, rtol=1e-14, atol=1e-14)


def test_compile_auto_stays_eager_on_cpu():
    from selectune.delta import hardconcrete

    gates = FlatGates(gated_modules(True, 3, "paper"), "auto")
    assert gates.math == (hardconcrete._flat_forward, hardconcrete._flat_backward, hardconcrete._penalty_terms)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled gate math is for CUDA)")
@pytest.mark.parametrize("structured,group_rows,penalty", VARIANTS)
def test_compiled_gate_math_equals_eager_on_cuda(structured, group_rows, penalty):
    """torch.rand stays outside the compiled functions, so both see the same noise: same θ, penalty, grads."""
    import copy

    results = []
    base = gated_modules(structured, group_rows, penalty)
    for mode in ("false", "true"):
        modules = [copy.deepcopy(m).float().cuda() for m in base]
        gates = FlatGates(modules, mode)
        outs = []
        for step in range(2):  # the second call runs the compiled code, not the tracing
            torch.manual_seed(step)
            gates.materialize(training=True)
            loss = sum((m.flat_tensors[n] * (i + 1)).sum() for i, (m, n) in enumerate(gates.entries))
            l0 = gates.take_l0()
            params = trainables(modules)
            grads = torch.autograd.grad(loss + 0.3 * l0, params)
            outs.append([*(m.flat_tensors[n].detach() for m, n in gates.entries), l0.detach(), *grads])
            gates.clear()
        results.append(outs)
    for eager, compiled in zip(*results, strict=True):
        for a, b in zip(eager, compiled, strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@functools.cache  # full fine-tuning's counts serve every variant
def phase1_step_ops(recipe: str, layers: int, *overrides: str) -> tuple[int, dict[str, int]]:
    """Kernel-like and host-sync-prone ops of one training forward + penalty + backward on tiny_random."""
    import sys

    from selectune.commands import RunSpec, build
    from selectune.tasks import load_task

    from conftest import REPO, compose_run

    sys.path.insert(0, str(REPO / "scripts" / "bench"))
    from phase1_ops import op_counter

    spec = RunSpec.from_config(compose_run(recipe, f"model.config_overrides.num_hidden_layers={layers}", *overrides))
    backbone, method = build(spec, load_task(spec.task))
    method.attach(backbone)
    model = backbone.model.train()
    ids = torch.tensor([[101, 2000, 2001, 2002, 102, 0, 0]] * 2)

    def step() -> None:
        loss = model(input_ids=ids, attention_mask=(ids != 0).long()).logits.sum()
        penalty = method.penalty()
        (loss if penalty is None else loss + penalty).backward()
        model.zero_grad(set_to_none=True)

    step()
    counter = op_counter()
    with counter:
        step()
    return counter.kernels, counter.syncs


@pytest.mark.parametrize("recipe,overrides", [
    ("glue/rte_udiff", ()),
    ("glue/rte_sdiff", ("method.group_rows=4", "method.group_penalty=paper"))])
def test_phase1_costs_a_fixed_number_of_ops_and_one_host_sync(recipe, overrides, data_env):
    """Two more layers (32 more gated tensors) add exactly what they add to full fine-tuning: the gating is
    a fixed number of ops per step, not per tensor. The one sync-prone op phase 1 adds to the model's own
    (the attention mask's check in transformers) is the word embeddings' unique."""
    full = {layers: phase1_step_ops("glue/rte_full", layers) for layers in (2, 4)}
    gated = {layers: phase1_step_ops(recipe, layers, *overrides) for layers in (2, 4)}
    assert gated[4][0] - gated[2][0] == full[4][0] - full[2][0]
    for layers in (2, 4):
        assert gated[layers][1] == {**full[layers][1], "_unique2": 1}


def test_a_bad_compile_setting_fails_before_training(data_env, tmp_path):
    from selectune.commands import train
    from selectune.errors import SelectuneError

    from conftest import compose_run

    with pytest.raises(SelectuneError, match="method.compile=maybe: use auto, true or false"):
        train(compose_run("glue/rte_udiff", "method.compile=maybe"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_failing_compile_falls_back_to_eager(monkeypatch, caplog):
    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler here")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    modules = gated_modules(True, 3, "paper")
    gates = FlatGates(modules, "true")
    with torch.no_grad():
        gates.materialize(training=False)
    assert "torch.compile of _flat_forward failed (no C++ compiler here): running it eagerly" in caplog.text
    for module, name in gates.entries:
        want = getattr(module, name) + module.delta(name, training=False)
        assert torch.allclose(module.flat_tensors[name], want)
