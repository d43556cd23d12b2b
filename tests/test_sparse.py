"""The SparseDelta form, exact selections, SaRA, and export: the math and the guarantees."""

from __future__ import annotations

import json

import pytest
import torch

from selectune.delta.sparse import SparseDeltaModule, delta_entries, wrap
from selectune.delta.taskdelta import TaskDelta
from selectune.errors import SelectuneError
from selectune.selection import mask_hash, overlap, select_below, select_k

from conftest import compose_run, run_cli


@pytest.mark.parametrize("shape,nnz,lead", [((5, 7), 9, (3,)), ((16, 4), 30, (2, 5)), ((3, 33), 1, (4, 2, 3))])
def test_sparse_linear_gradient_equals_dense_masked_gradient(shape, nnz, lead):
    torch.manual_seed(sum(shape) + nnz)
    out_f, in_f = shape
    linear = torch.nn.Linear(in_f, out_f).double().requires_grad_(False)
    idx = torch.randperm(out_f * in_f)[:nnz].sort().values.to(torch.int32)
    bias_idx = torch.tensor([0, out_f - 1], dtype=torch.int32)
    module = SparseDeltaModule(linear, {"weight": idx, "bias": bias_idx}).double()
    with torch.no_grad():
        module.weight_delta.normal_()
        module.bias_delta.normal_()
    x = torch.randn(*lead, in_f, dtype=torch.float64, requires_grad=True)
    y = module(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    # the dense reference: W0 + masked delta as one dense leaf, gradient masked afterwards
    mask = torch.zeros(out_f * in_f, dtype=torch.bool)
    mask[idx.long()] = True
    dense_delta = torch.zeros(out_f * in_f, dtype=torch.float64)
    dense_delta[idx.long()] = module.weight_delta.detach()
    w = (linear.weight.detach() + dense_delta.view(shape)).requires_grad_(True)
    b = linear.bias.detach().clone()
    b[bias_idx.long()] += module.bias_delta.detach()
    b.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, w, b)
    (y_ref * g).sum().backward()
    assert torch.allclose(y, y_ref, atol=1e-12)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-12)
    assert torch.allclose(module.weight_delta.grad, w.grad.reshape(-1)[mask], atol=1e-12)
    assert torch.allclose(module.bias_delta.grad, b.grad[bias_idx.long()], atol=1e-12)
    assert linear.weight.grad is None  # no dense weight gradient was made


def test_generic_path_for_layernorm_and_embedding():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.LayerNorm(6)).double().requires_grad_(False)
    wrappers = wrap(model, {"0.weight": torch.tensor([3, 20, 65], dtype=torch.int32),
                            "1.weight": torch.tensor([1, 4], dtype=torch.int32),
                            "1.bias": torch.tensor([0], dtype=torch.int32)})
    for w in wrappers.values():
        w.double()
        for name in w.delta_names:
            torch.nn.init.normal_(w.parts(name)[1])
    tokens = torch.tensor([[3, 3, 10], [1, 0, 5]])
    out = model(tokens)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    ref_e = model[0].weight.detach().clone().reshape(-1)
    ref_e[[3, 20, 65]] += wrappers["0"].weight_delta.detach()
    ref_e = ref_e.view(11, 6).requires_grad_(True)
    ref_w = model[1].weight.detach().clone()
    ref_w[[1, 4]] += wrappers["1"].weight_delta.detach()
    ref_b = model[1].bias.detach().clone()
    ref_b[[0]] += wrappers["1"].bias_delta.detach()
    ref_w.requires_grad_(True), ref_b.requires_grad_(True)
    ref = torch.nn.functional.layer_norm(torch.nn.functional.embedding(tokens, ref_e), (6,), ref_w, ref_b)
    (ref * g).sum().backward()
    assert torch.allclose(out, ref)
    assert torch.allclose(wrappers["0"].weight_delta.grad, ref_e.grad.reshape(-1)[[3, 20, 65]])
    assert torch.allclose(wrappers["1"].weight_delta.grad, ref_w.grad[[1, 4]])
    assert torch.allclose(wrappers["1"].bias_delta.grad, ref_b.grad[[0]])
    entries = delta_entries(wrappers)
    assert entries["0.weight::indices"].tolist() == [3, 20, 65]


# ------------------------------------------------------------------ exact selection
def test_select_k_is_exact_with_a_stable_tie_break():
    scores = {"b": torch.tensor([1.0, 0.5, 0.5, 3.0]), "a": torch.tensor([0.5, 2.0, 0.5])}
    chosen = select_k(scores, 3, largest=False)  # five entries tie at 0.5: a[0], a[2], then b[1]
    assert {k: v.tolist() for k, v in chosen.items()} == {"a": [0, 2], "b": [1]}
    assert {k: v.tolist() for k, v in select_k(scores, 2, largest=True).items()} == {"b": [3], "a": [1]}
    assert mask_hash(chosen) == mask_hash(select_k(scores, 3, largest=False))
    assert mask_hash(chosen) != mask_hash(select_k(scores, 4, largest=False))
    with pytest.raises(SelectuneError, match="does not fit the 7 selectable entries"):
        select_k(scores, 8, largest=False)


def test_select_k_on_random_scores_matches_a_sort():
    torch.manual_seed(1)
    scores = {f"t{i}": torch.randn(50, 7) for i in range(4)}
    chosen = select_k(scores, 123, largest=False)
    flat = torch.cat([scores[n].reshape(-1) for n in sorted(scores)])
    expected = set(torch.argsort(flat.abs() * 0 + flat, stable=True)[:123].tolist())
    got = set()
    for i, name in enumerate(sorted(scores)):
        got |= {350 * i + j for j in chosen.get(name, torch.zeros(0)).tolist()}
    assert got == expected and sum(v.numel() for v in chosen.values()) == 123


def test_select_k_matches_a_stable_sort_with_ties_infinities_and_signed_zeros():
    values = torch.tensor([-torch.inf, -2.5, -0.0, 0.0, 0.5, 1e-30, -1e-30, 3.0, 3.0000002, torch.inf])
    gen = torch.Generator().manual_seed(3)
    scores = {f"t{i}": values[torch.randint(0, len(values), (40 + 7 * i,), generator=gen)] for i in range(5)}
    names = sorted(scores)
    flat = torch.cat([scores[n] for n in names])
    offsets = dict(zip(names, torch.cumsum(torch.tensor([0] + [scores[n].numel() for n in names]), 0).tolist(),
                       strict=False))
    for largest in (False, True):
        order = torch.argsort(-flat if largest else flat, stable=True)  # ties: the earliest (name, index)
        for k in (1, 13, 100, flat.numel()):
            chosen = select_k(scores, k, largest)
            got = {offsets[n] + int(i) for n, idx in chosen.items() for i in idx}
            assert got == set(order[:k].tolist()), (largest, k)
            assert all(torch.equal(idx, idx.sort().values) and idx.dtype == torch.int32 for idx in chosen.values())


def test_order_keys_sort_as_the_floats_do():
    from selectune.selection import order_keys

    torch.manual_seed(0)
    x = torch.cat([torch.randn(500) * 10 ** torch.randint(-30, 30, (500,)).float(),
                   torch.tensor([torch.inf, -torch.inf, 0.0, 3.4e38, -3.4e38, 1e-45, -1e-45])])
    x = x[torch.isfinite(x) | torch.isinf(x)].unique()  # distinct values: one order only
    assert torch.equal(torch.argsort(order_keys(x)), torch.argsort(x))
    assert torch.equal(torch.argsort(order_keys(x, descending=True)), torch.argsort(-x))
    assert order_keys(torch.tensor([-0.0])).item() == order_keys(torch.tensor([0.0])).item()


def test_overlap_counts_shared_entries_and_tensors_only_one_selection_touches(tmp_path):
    a = {"q": torch.tensor([1, 4, 9], dtype=torch.int32), "ln": torch.tensor([0, 2], dtype=torch.int32),
         "empty": torch.zeros(0, dtype=torch.int32)}
    b = {"q": torch.tensor([4, 5, 9, 11], dtype=torch.int32), "v": torch.tensor([7], dtype=torch.int32)}
    assert overlap(a, b) == {"a": 5, "b": 5, "shared": 2, "tensors_a": 2, "tensors_b": 2,
                             "tensors_only_a": ["ln"], "tensors_only_b": ["v"],
                             "entries_only_a_tensors": 2, "entries_only_b_tensors": 1}
    assert overlap(a, a)["shared"] == 5 and overlap(a, {})["shared"] == 0
    # read back from a stored delta, plain and compact: the mask is the one that was saved
    tensors = {f"{n}::indices": i for n, i in b.items()} | {f"{n}::values": torch.ones(len(i)) for n, i in b.items()}
    tensors["head.weight::set"] = torch.zeros(2, 3)
    for compact in (None, "float16"):
        TaskDelta(tensors, {"base_hash": "h", "method": "sara", "config": {}}).save(tmp_path / "d.safetensors",
                                                                                   compact=compact)
        loaded = TaskDelta.load(tmp_path / "d.safetensors").sparse_indices()
        assert {n: i.tolist() for n, i in loaded.items()} == {n: i.tolist() for n, i in b.items()}


def test_select_below_threshold():
    chosen = select_below({"w": torch.tensor([0.1, -0.001, 0.002, -0.0005])}, 2e-3)
    assert chosen["w"].tolist() == [1, 3]


# ------------------------------------------------------------------ SaRA end to end
def test_sara_trains_exactly_the_budget_and_leaves_the_rest_bit_identical(data_env, tmp_path):
    from selectune.commands import RunSpec, build
    from selectune.tasks import load_task

    cfg = compose_run("glue/mrpc_sara", "trainer.max_steps=4", "trainer.lr=1e-2")
    results = __import__("selectune.commands", fromlist=["train"]).train(cfg, tmp_path / "run")
    budget = results["budget"]
    assert budget["stored"] == budget["asked"] == round(0.005 * budget["backbone"])
    delta = TaskDelta.load(tmp_path / "run")
    spec = RunSpec.from_config(cfg)
    fresh, _ = build(spec, load_task(spec.task))
    base = {n: p.detach().clone() for n, p in fresh.model.named_parameters()}
    delta.merge_into(fresh.model)
    changed = 0
    for name, parts in delta.by_parameter().items():
        after = fresh.model.get_parameter(name).detach()
        if name in fresh.head_names:
            continue
        diff = (after != base[name]).reshape(-1)
        outside = torch.ones_like(diff)
        outside[parts["indices"].long()] = False
        assert not diff[outside].any(), name  # entries outside the mask are bit-identical to the base
        changed += int(diff.sum())
    assert changed > 0.9 * (budget["stored"] - budget["head"])
    # SaRA picked the smallest |w|: every selected entry is below every unselected one
    selected = torch.cat([base[n].reshape(-1)[p["indices"].long()].abs() for n, p in delta.by_parameter().items()
                          if "indices" in p])
    assert float(selected.max()) == pytest.approx(results["method_state"]["max_selected_abs_weight"])


def test_sara_optimizer_state_only_for_selected_values(data_env):
    from selectune.commands import RunSpec, build
    from selectune.tasks import load_task

    spec = RunSpec.from_config(compose_run("glue/rte_sara"))
    backbone, method = build(spec, load_task(spec.task))
    method.attach(backbone)
    trainable = method.trainable()
    assert all(n.endswith("_delta") or n in backbone.head_names for n in trainable)
    assert all(p.ndim == 1 for n, p in trainable.items() if n.endswith("_delta"))
    assert not any(p.requires_grad for p in backbone.base_parameters().values())
    optimizer = torch.optim.AdamW(method.param_groups(1e-3, 0.0))
    batch = {"input_ids": torch.randint(1000, 2000, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    backbone.model(**batch).logits.sum().backward()
    optimizer.step()
    state_numel = sum(s["exp_avg"].numel() for s in optimizer.state.values())
    assert state_numel == method.report().trainable == method.report().stored
    assert all(p.grad is None for p in backbone.base_parameters().values())


def test_sara_threshold_mode_and_bad_budgets(data_env, tmp_path):
    from selectune.commands import train

    results = train(compose_run("glue/rte_sara", "budget=none", "method.threshold=0.01", "trainer.max_steps=1"),
                    tmp_path / "a")
    assert results["method_state"]["selected"] > 0 and results["method_state"]["max_selected_abs_weight"] < 0.01
    with pytest.raises(SelectuneError, match="selects nothing"):
        train(compose_run("glue/rte_sara", "budget=none", "method.threshold=1e-12"), tmp_path / "b")
    with pytest.raises(SelectuneError, match="does not fit"):
        train(compose_run("glue/rte_sara", "budget.fraction=null", "budget.count=10000000"), tmp_path / "c")
    for name in ("b", "c"):
        assert not (tmp_path / name).exists()  # nothing written


def test_sara_progressive_reselection_keeps_left_out_deltas(data_env, tmp_path):
    from selectune.commands import train

    results = train(compose_run("glue/rte_sara", "method.progressive_step=3", "trainer.max_steps=6",
                                "trainer.lr=5e-2"), tmp_path / "run")
    hashes = results["method_state"]["mask_hashes"]
    assert len(hashes) == 2 and hashes[0] != hashes[1]
    budget = results["budget"]
    assert budget["trainable"] == budget["asked"]  # the new set has the budget's size again
    assert budget["stored"] > budget["trainable"]  # left-out entries keep their (frozen) delta
    assert TaskDelta.load(tmp_path / "run").stored == budget["stored"]


def test_sara_nuclear_penalty_is_logged(data_env, tmp_path):
    from selectune.commands import train

    train(compose_run("glue/rte_sara", "method.nuclear_weight=5e-4", "trainer.max_steps=2", "trainer.log_every=1"),
          tmp_path / "run")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["penalty"] >= 0 for r in records if "loss" in r)


# ------------------------------------------------------------------ storage and export
def test_bytes_per_stored_parameter(data_env, tmp_path):
    from selectune.commands import train

    budget = ("trainer.max_steps=1", "budget.fraction=null", "budget.count=20000")
    results = train(compose_run("glue/rte_sara", *budget), tmp_path / "plain")
    compact = train(compose_run("glue/rte_sara", *budget, "compact=float16"), tmp_path / "compact")
    stored = results["budget"]["stored"]
    assert results["delta_bytes"] / stored <= 8.5
    assert compact["delta_bytes"] / stored <= 4.5
    a, b = TaskDelta.load(tmp_path / "plain").tensors, TaskDelta.load(tmp_path / "compact").tensors
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith("::indices"))


def test_export_round_trip_matches_the_in_training_model(data_env, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from selectune.commands import RunSpec, build, encode_splits
    from selectune.evaluation import predict
    from selectune.export import export
    from selectune.tasks import load_task
    from selectune.trainer import Trainer

    cfg = compose_run("glue/mrpc_sara", "trainer.max_steps=5", "trainer.lr=1e-2", "method.progressive_step=3")
    spec = RunSpec.from_config(cfg)
    task = load_task(spec.task)
    backbone, method = build(spec, task)
    meta = {"base_model": backbone.name, "base_hash": backbone.base_hash(), "method": "sara",
            "config": __import__("omegaconf").OmegaConf.to_container(cfg, resolve=True)}
    splits = encode_splits(task, backbone, ["train", "dev"])
    method.attach(backbone)
    Trainer(spec.trainer, task, method, splits, tmp_path, lambda p: TaskDelta(method.delta(), meta).save(p)).fit()
    in_training = predict(method.model, splits["dev"], 16, torch.device("cpu"))
    report = export(str(tmp_path / "delta.safetensors"), str(tmp_path / "hf"))
    assert report["lost_in_dtype"] == 0 and report["changed_entries"] > 0
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    exported = predict(plain, splits["dev"], 16, torch.device("cpu"))
    assert abs(exported - in_training).max() <= 1e-5


def test_export_cli_dtype_report_and_refusals(data_env, tmp_path):
    from selectune.commands import train

    train(compose_run("glue/rte_lora", "trainer.max_steps=2"), tmp_path / "run")
    result = run_cli("export", f"run={tmp_path / 'run'}", f"out={tmp_path / 'bf16'}", "dtype=bfloat16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "below bfloat16's resolution" in result.stdout
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    # a delta whose recorded base hash differs: refused, nothing written; force=true merges anyway
    from selectune.export import export

    delta = TaskDelta.load(tmp_path / "run")
    delta.meta["base_hash"] = "0" * 16
    delta.save(tmp_path / "other.safetensors")
    with pytest.raises(SelectuneError, match="pass force=true"):
        export(str(tmp_path / "other.safetensors"), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    assert export(str(tmp_path / "other.safetensors"), str(tmp_path / "x"), force=True)["base_hash_matched"] is False
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes((tmp_path / "run" / "delta.safetensors").read_bytes()[:300])
    with pytest.raises(SelectuneError, match="truncated or corrupted"):
        export(str(truncated), str(tmp_path / "y"))
    assert not (tmp_path / "y").exists()


def test_lost_in_cast_counts_sub_resolution_updates():
    from selectune.export import lost_in_cast

    before = torch.tensor([1.0, 1.0, 0.001, 5.0])
    after = torch.tensor([1.0 + 1e-4, 1.5, 0.001 + 1e-4, 5.0])
    assert lost_in_cast(before, after, torch.bfloat16) == (3, 1)  # 1 + 1e-4 rounds back to 1 in bf16
    assert lost_in_cast(before, after, torch.float32) == (3, 0)


def test_sparse_gradient_fallback_without_the_sddmm_kernel(monkeypatch):
    from selectune.delta import sparse

    torch.manual_seed(3)
    dy, x = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    idx = torch.tensor([0, 5, 6, 17, 23], dtype=torch.int32)
    expected = (dy.t() @ x).reshape(-1)[idx.long()]
    assert torch.allclose(sparse.sampled_weight_grad(dy, x, idx, (6, 4)), expected)

    def missing(*args, **kwargs):
        raise NotImplementedError("no sampled_addmm here")

    monkeypatch.setattr(torch.sparse, "sampled_addmm", missing)
    monkeypatch.setattr(sparse, "GRAD_CHUNK_ELEMENTS", 20)  # two entries per chunk: the chunk loop runs
    assert torch.allclose(sparse.sampled_weight_grad(dy, x, idx, (6, 4)), expected)
