"""Diff pruning: the hard-concrete math, the structured penalty, the projection, and phase 2."""

from __future__ import annotations

import json
import math

import pytest
import torch

from selectune.delta.hardconcrete import HardConcreteModule, gate, p_nonzero
from selectune.delta.taskdelta import TaskDelta
from selectune.errors import SelectuneError

from conftest import compose_run


def test_empirical_nonzero_probability_matches_the_closed_form():
    torch.manual_seed(0)
    alpha = torch.tensor([-3.0, -1.0, 0.0, 0.7, 2.0, 5.0])
    n = 200_000
    samples = gate(alpha.expand(n, -1), -1.5, 1.5, training=True)
    empirical = (samples > 0).float().mean(0)
    expected = p_nonzero(alpha, -1.5, 1.5)
    assert torch.allclose(expected, torch.sigmoid(alpha - math.log(1.5 / 1.5)))
    stderr = torch.sqrt(expected * (1 - expected) / n)
    assert ((empirical - expected).abs() <= 4 * stderr + 1e-4).all(), (empirical, expected)
    # other stretch limits: c = log(-l/r) is not zero
    samples = gate(alpha.expand(n, -1), -0.1, 1.1, training=True)
    expected = torch.sigmoid(alpha - math.log(0.1 / 1.1))
    stderr = torch.sqrt(expected * (1 - expected) / n)
    assert ((samples > 0).float().mean(0) - expected).abs().le(4 * stderr + 1e-4).all()


def test_eval_gate_is_deterministic_and_within_0_1():
    alpha = torch.linspace(-8, 8, 33)
    z = gate(alpha, -1.5, 1.5, training=False)
    assert torch.equal(z, gate(alpha, -1.5, 1.5, training=False))
    assert torch.equal(z, (torch.sigmoid(alpha) * 3 - 1.5).clamp(0, 1))
    assert z.min() == 0 and z.max() == 1


@pytest.mark.parametrize("group_rows", [None, 2])
def test_structured_penalty_equals_the_formula(group_rows):
    torch.manual_seed(1)
    linear = torch.nn.Linear(3, 5).requires_grad_(False)
    module = HardConcreteModule(linear, ["weight", "bias"], 5.0, -1.5, 1.5, group_rows, structured=True,
                                group_penalty="paper")
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "alpha" in name:
                p.normal_(0, 2)
    c = math.log(1.5 / 1.5)
    for name in ("weight", "bias"):
        alpha = getattr(module, f"{name}_alpha")
        group_alpha = getattr(module, f"{name}_group_alpha")
        rows = alpha.shape[0]
        groups = [0] * rows if group_rows is None else [r // group_rows for r in range(rows)]
        expected = sum(torch.sigmoid(alpha[r] - c).sum() * torch.sigmoid(group_alpha[groups[r]] - c)
                       for r in range(rows))
        assert torch.allclose(module.expected_l0(name), expected)
    module.group_penalty = "reference"  # the released code's form: entry terms plus one term per group
    for name in ("weight", "bias"):
        expected = (torch.sigmoid(getattr(module, f"{name}_alpha") - c).sum()
                    + torch.sigmoid(getattr(module, f"{name}_group_alpha") - c).sum())
        assert torch.allclose(module.expected_l0(name), expected)
    unstructured = HardConcreteModule(torch.nn.Linear(3, 5), ["weight"], 5.0, -1.5, 1.5, None, structured=False,
                                      group_penalty="paper")
    with torch.no_grad():
        unstructured.weight_alpha.normal_()
    assert torch.allclose(unstructured.expected_l0("weight"), torch.sigmoid(unstructured.weight_alpha).sum())


def test_an_entry_is_on_only_if_its_group_is_on():
    linear = torch.nn.Linear(4, 4).requires_grad_(False)
    module = HardConcreteModule(linear, ["weight"], 5.0, -1.5, 1.5, group_rows=2, structured=True,
                                group_penalty="paper")
    with torch.no_grad():
        module.weight_group_alpha[1] = -20.0  # rows 2-3 off
        module.weight_w.fill_(1.0)
    z = module.mask("weight", training=False)
    assert (z[:2] > 0).all() and (z[2:] == 0).all()
    x = torch.randn(3, 4)
    module.eval()
    delta_w = module.delta("weight", training=False)
    assert torch.allclose(module(x), torch.nn.functional.linear(x, linear.weight + delta_w, linear.bias))


def test_gradients_reach_w_and_alpha_through_the_sample():
    torch.manual_seed(2)
    emb = torch.nn.Embedding(7, 3).requires_grad_(False)
    module = HardConcreteModule(emb, ["weight"], 1.0, -1.5, 1.5, None, structured=True, group_penalty="paper")
    with torch.no_grad():
        module.weight_w.normal_()
    module.train()
    for _ in range(20):  # a clamped gate (z = 0 or 1) passes no gradient to its logit: sample a few times
        module(torch.tensor([[1, 2, 2]])).sum().backward()
    assert module.weight_w.grad.abs().sum() > 0 and module.weight_alpha.grad.abs().sum() > 0
    assert module.weight_group_alpha.grad.abs().sum() > 0 and emb.weight.grad is None


@pytest.mark.parametrize("structured,group_rows", [(False, None), (True, None), (True, 3)])
def test_embedding_gates_only_looked_up_rows_with_the_full_tables_values_and_gradients(structured, group_rows):
    torch.manual_seed(3)
    emb = torch.nn.Embedding(9, 4, padding_idx=2).double().requires_grad_(False)
    module = HardConcreteModule(emb, ["weight"], 1.0, -1.5, 1.5, group_rows, structured=structured,
                                group_penalty="paper")
    with torch.no_grad():
        for p in (module.weight_w, module.weight_alpha, getattr(module, "weight_group_alpha", module.weight_w)):
            p.normal_()
    module.eval()  # deterministic gates, so both paths see the same z
    ids = torch.tensor([[5, 2, 2, 7], [0, 5, 8, 2]])
    out = module(ids)
    full = torch.nn.functional.embedding(ids, emb.weight + module.delta("weight", False), padding_idx=2)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), [module.weight_w, module.weight_alpha])
    expected = torch.autograd.grad((full * weights).sum(), [module.weight_w, module.weight_alpha])
    assert torch.allclose(out, full)
    for got, want in zip(grads, expected, strict=True):
        assert torch.allclose(got, want) and (got[2] == 0).all() and (got[[1, 3, 4, 6]] == 0).all()


# ------------------------------------------------------------------ both phases in one run
@pytest.mark.parametrize("method", ["udiff", "sdiff"])
def test_two_phases_project_exactly_and_keep_the_rest_bit_identical(method, data_env, tmp_path):
    from selectune.commands import RunSpec, build, train
    from selectune.tasks import load_task

    cfg = compose_run(f"glue/rte_{method}", "trainer.epochs=2", "method.phase1_epochs=1", "method.log_every=2",
                      "trainer.log_every=2", "trainer.lr=1e-2", "method.l0_weight=1e-4",
                      "trainer.eval_every=2")
    results = train(cfg, tmp_path / "run")
    budget = results["budget"]
    assert budget["stored"] == budget["trainable"] == budget["asked"] == round(0.005 * budget["backbone"])
    state = results["method_state"]
    assert state["phase"] == 2 and state["kept"] == budget["stored"] - budget["head"]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    phase1 = [r for r in records if r.get("phase") == 1.0]
    assert phase1 and all(0 < r["expected_density"] <= 1 and 0 <= r["groups_off_fraction"] <= 1 for r in phase1)
    assert all("z_nonzero_sampled" in r and "z_nonzero_eval" in r and r["penalty"] > 0 for r in phase1)
    # phase 1's evaluations are marked as not of a storable form: a resumed sweep candidate does not report them
    storable = [e.get("storable", True) for e in results["evals"]]
    assert storable == sorted(storable) and not storable[0] and storable[-1], storable
    delta = TaskDelta.load(tmp_path / "run")
    assert delta.stored == budget["stored"]
    spec = RunSpec.from_config(cfg)
    fresh, _ = build(spec, load_task(spec.task))
    base = {n: p.detach().clone() for n, p in fresh.model.named_parameters()}
    delta.merge_into(fresh.model)
    for name, parts in delta.by_parameter().items():
        if name in fresh.head_names:
            continue
        diff = (fresh.model.get_parameter(name).detach() != base[name]).reshape(-1)
        outside = torch.ones_like(diff)
        outside[parts["indices"].long()] = False
        assert not diff[outside].any(), name


def test_the_projection_record_reaches_metrics_jsonl_off_the_log_steps(data_env, tmp_path):
    """The switch to phase 2 reports once; the next metrics record carries it, wherever log_every falls."""
    from selectune.commands import train

    cfg = compose_run("glue/rte_udiff", "trainer.epochs=2", "method.phase1_epochs=1", "trainer.log_every=1000",
                      "method.log_every=1000", "trainer.lr=1e-2", "method.l0_weight=1e-4")
    results = train(cfg, tmp_path / "run")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "projected_from_nonzero" in r]
    assert len(logged) == 1 and logged[0]["kept"] == results["method_state"]["kept"]


def test_projection_keeps_exactly_k_by_magnitude(data_env):
    from selectune.commands import RunSpec, build
    from selectune.tasks import load_task

    spec = RunSpec.from_config(compose_run("glue/rte_udiff"))
    backbone, method = build(spec, load_task(spec.task))
    method.attach(backbone)
    method.plan(total_steps=20, steps_per_epoch=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for module in method.hardconcrete.values():
            for name in module.delta_names:
                getattr(module, f"{name}_w").normal_()
    deltas = torch.cat([m.delta(n, training=False).reshape(-1) for m in method.hardconcrete.values()
                        for n in m.delta_names])
    k = method.budget - method.head
    threshold = deltas.abs().sort(descending=True).values[k - 1]
    method.project()
    kept = torch.cat([w.parts(n)[1].detach() for w in method.wrappers.values() for n in w.delta_names])
    assert kept.numel() == k and kept.abs().min() >= threshold
    assert method.trainable_version == 1 and method.phase == 2
    assert all(not n.endswith(("_w", "_alpha")) for n in method.trainable())
    saved = method.state()
    _, again = build(spec, load_task(spec.task))
    again.attach(build(spec, load_task(spec.task))[0])
    again.load_state(saved)  # resume after the projection rebuilds the same sparse structure
    assert {n: p.shape for n, p in again.trainable().items()} == {n: p.shape for n, p in method.trainable().items()}


def test_projection_below_the_budget_fills_by_gate_probability(data_env):
    """Phase 1 sparser than k: every nonzero δ is kept, the rest of k goes to the largest log P(z > 0)."""
    from selectune.commands import RunSpec, build
    from selectune.tasks import load_task

    spec = RunSpec.from_config(compose_run("glue/rte_sdiff"))
    backbone, method = build(spec, load_task(spec.task))
    method.attach(backbone)
    method.plan(total_steps=20, steps_per_epoch=4)
    k = method.budget - method.head
    gen = torch.Generator().manual_seed(0)
    expected = {}
    with torch.no_grad():
        for m, module in method.hardconcrete.items():
            for n in module.delta_names:
                group = getattr(module, f"{n}_group_alpha")
                group.copy_(torch.rand(group.shape, generator=gen) * 2 + 1)  # groups open: z_g > 0 in eval
                alpha, w = getattr(module, f"{n}_alpha"), getattr(module, f"{n}_w")
                alpha.copy_(torch.randn(alpha.shape, generator=gen) * 3 - 4)
                w.zero_()
                on = torch.rand(w.shape, generator=gen) < 0.002  # a few entries with a real diff
                alpha[on], w[on] = 5.0, 1.0
                expected[f"{m}.{n}"] = torch.where(on, torch.inf, module.log_keep(n)).reshape(-1)
    nonzero = sum(int(torch.isinf(e).sum()) for e in expected.values())
    assert 0 < nonzero < k
    flat = torch.cat([expected[key] for key in sorted(expected)])
    want = torch.zeros_like(flat, dtype=torch.bool)
    want[flat.topk(k).indices] = True
    method.project()
    got = torch.cat([torch.zeros(expected[key].numel(), dtype=torch.bool).index_fill_(
        0, method.wrappers[key.rsplit(".", 1)[0]].parts(key.rsplit(".", 1)[1])[0].long(), True)
        for key in sorted(expected)])
    assert int(got.sum()) == k and torch.equal(got, want)
    assert method.projection["filled_by_gate_probability"] == k - nonzero


def test_phase_schedule_is_validated_before_training(data_env, tmp_path):
    from selectune.commands import train

    with pytest.raises(SelectuneError, match="phase 1 .* must end before"):
        train(compose_run("glue/rte_sdiff", "trainer.epochs=3", "method.phase1_epochs=3"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(SelectuneError, match="exact budget"):
        train(compose_run("glue/rte_sdiff", "budget=none"), tmp_path / "run")
    with pytest.raises(SelectuneError, match="group_penalty"):
        train(compose_run("glue/rte_sdiff", "method.group_penalty=product"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
