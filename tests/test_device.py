"""Device placement and mixed precision, for every method.

On this CPU-only machine: bf16/fp16 autocast runs on CPU, and a float64 conversion of an attached
model catches any method tensor that is not registered with the model (such a tensor would also be
left behind by `model.to("cuda")`). Tests marked `cuda` run where a GPU is present.
"""

from __future__ import annotations

import pytest
import torch

from selectune.delta.taskdelta import TaskDelta
from selectune.errors import SelectuneError
from selectune.methods import METHODS as REGISTRY
from selectune.trainer import resolve_precision

from conftest import compose_run

# every registered method that runs on text, with what it says it needs to finish in a few steps on the tiny
# model (Method.quick_test): a new method is tested here once it is registered
METHODS = sorted(name for name, cls in REGISTRY.items() if "text" in cls.quick_test)


def quick(method: str) -> list[str]:
    return list(REGISTRY[method].quick_test["text"])
NO_DROPOUT = ["+model.config_overrides.hidden_dropout_prob=0.0",
              "+model.config_overrides.attention_probs_dropout_prob=0.0"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def overrides(method: str) -> list[str]:
    return ["trainer.max_steps=3", *quick(method), "task.max_train_examples=24", "task.max_eval_examples=16"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_under_autocast_and_stores_fp32(method, precision, data_env, tmp_path):
    from selectune.commands import train

    results = train(compose_run(f"glue/rte_{method}", f"trainer.precision={precision}", *overrides(method)),
                    tmp_path / "run")
    assert results["device"] == "cpu"
    # what timed it: the CPU, its native bf16 support (what precision=auto reads) and torch's threads
    native = "native bf16" if resolve_precision("auto", torch.device("cpu")) == "bf16" else "no native bf16"
    assert results["machine"].endswith(f"({native}), {torch.get_num_threads()} thread"
                                       + ("s" if torch.get_num_threads() != 1 else ""))
    delta = TaskDelta.load(tmp_path / "run")
    assert all(t.dtype in (torch.float32, torch.int32) for t in delta.tensors.values())
    assert torch.isfinite(torch.cat([t.float().reshape(-1) for t in delta.tensors.values()])).all()


@pytest.mark.parametrize("method", METHODS)
def test_method_tensors_follow_the_model(method, data_env):
    """Convert an attached model to float64 and run it: an unregistered method tensor would break."""
    from selectune.commands import RunSpec, build
    from selectune.methods.base import ProbeBatches
    from selectune.tasks import load_task

    spec = RunSpec.from_config(compose_run(f"glue/rte_{method}", *quick(method)))
    backbone, m = build(spec, load_task(spec.task))
    ids = torch.randint(1000, 2000, (2, 6))
    probe = ProbeBatches(lambda n: ({"input_ids": ids, "labels": torch.tensor([0, 1])} for _ in range(n)),
                         torch.nn.functional.cross_entropy)  # for methods that look at gradients first (SPT)
    m.attach(backbone, probe)
    if hasattr(m, "project"):
        m.plan(total_steps=20, steps_per_epoch=4)
        m.project()  # phase 2's sparse wrappers must follow too
    model = backbone.model.double().train()
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert logits.dtype == torch.float64
    logits.sum().backward()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float64, name


def test_unknown_precision_and_missing_cuda(data_env, tmp_path):
    from selectune.commands import train

    with pytest.raises(SelectuneError, match="trainer.precision='fp8'"):
        train(compose_run("glue/rte_full", "trainer.precision=fp8"), tmp_path / "a")
    if not torch.cuda.is_available():
        with pytest.raises(SelectuneError, match="CUDA is not available"):
            train(compose_run("glue/rte_full", "trainer.device=cuda", "trainer.max_steps=1"), tmp_path / "b")


@cuda
@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_cuda_in_bf16(method, data_env, tmp_path):
    from selectune.commands import train

    results = train(compose_run(f"glue/rte_{method}", "trainer.device=cuda", "trainer.precision=bf16",
                                *overrides(method)), tmp_path / "run")
    assert results["device"].startswith("cuda") and results["peak_memory_mb"] > 0
    delta = TaskDelta.load(tmp_path / "run")
    assert all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.int32) for t in delta.tensors.values())


@cuda
def test_cuda_results_match_cpu_in_fp32(data_env, tmp_path):
    from selectune.commands import train

    # Dropout off: CPU and CUDA draw dropout masks from different generators, so with it on the two runs
    # train on different noise (with it on, this test failed on an H200); without it only float rounding
    # is left.
    same = ["trainer.max_steps=3", *NO_DROPOUT]
    a = train(compose_run("glue/rte_sara", "trainer.device=cpu", *same), tmp_path / "cpu")
    b = train(compose_run("glue/rte_sara", "trainer.device=cuda", *same), tmp_path / "gpu")
    da, db = TaskDelta.load(tmp_path / "cpu").tensors, TaskDelta.load(tmp_path / "gpu").tensors
    assert all(torch.allclose(da[k].float(), db[k].float(), atol=1e-4) for k in da)
    assert a["steps"] == b["steps"]
