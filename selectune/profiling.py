"""Per-step profiling without a GPU: what one training step dispatches, and which of it can stall a GPU.

On a GPU a step of selective fine-tuning is rarely FLOP-bound: it is bound by how many kernels the host
launches and by every point where the host waits for the device (a host sync drains the queue, so the
next layer's launches no longer overlap the current layer's work). Both can be counted on a CPU:
`OpCounter`, a TorchDispatchMode, sees every ATen operation one step dispatches —
  - `kernels`: "kernel-like" operations, i.e. all but views/aliases/detach (no kernel runs for those);
  - `syncs`: sync-prone operations, the ones whose CUDA implementation reads a device value on the host
    (bincount, nonzero, item/_local_scalar_dense, boolean-mask indexing, repeat_interleave without
    output_size, unique, ...). Counted on any device, so a CPU test catches them before a GPU run does.
A foreach/fused operation counts once, as on CUDA (on CPU its per-tensor fallback runs below the mode).

`StepBench` builds one method on one model with fixed random token batches and runs the same step the
trainer runs (forward under autocast, penalty, backward, AdamW as the trainer builds it, after_step,
zero_grad); `scripts/bench/bench_step.py` times it and the tests count it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operations whose CUDA kernel copies a device value to the host (or sizes its output from device data).
_ALWAYS_SYNC = {aten.bincount, aten.nonzero, aten._local_scalar_dense, aten.item, aten.is_nonzero,
                aten.masked_select, aten.equal, aten._unique, aten._unique2, aten.unique_dim,
                aten.unique_consecutive, aten.unique_dim_consecutive, aten.argwhere}
_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def sync_prone(func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    """True for an operation that makes a CUDA host wait for the device (see the module docstring)."""
    packet = func.overloadpacket
    if packet in _ALWAYS_SYNC:
        return True
    if packet in _INDEXING:  # boolean-mask indexing is a nonzero in disguise
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if packet is aten.repeat_interleave:  # a tensor of repeats without output_size sums them on the host
        repeats = args[0] if func is aten.repeat_interleave.Tensor else (args[1] if len(args) > 1 else None)
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    return False


class OpCounter(TorchDispatchMode):
    """Counts the operations dispatched inside `with OpCounter() as c:` (see the module docstring)."""

    def __init__(self, host_tensors: Sequence[torch.Tensor] = ()) -> None:
        """`host_tensors`: tensors that stay on the host in a CUDA run too (foreach AdamW's step counters),
        whose reads are no device sync there."""
        super().__init__()
        self.host = {t.data_ptr() for t in host_tensors}
        self.total = 0
        self.kernels = 0
        self.by_op: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        self.total += 1
        first = args[0] if args else None
        on_host = (bool(self.host) and isinstance(first, torch.Tensor) and first.layout == torch.strided
                   and first.data_ptr() in self.host)
        if not (on_host or func.is_view or func.overloadpacket in (aten.detach, aten.alias, aten.lift_fresh)):
            self.kernels += 1
            self.by_op[str(func.overloadpacket)] += 1
        if not on_host and sync_prone(func, args, kwargs):
            self.syncs[str(func)] += 1
        return func(*args, **kwargs)

    @property
    def sync_count(self) -> int:
        return sum(self.syncs.values())


@dataclass
class StepBench:
    """One method attached to one model, fixed random batches, and the trainer's step (see module doc)."""

    method: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    device: torch.device
    dtype: torch.dtype | None
    built_for: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    adamw_mode: str = "trainer"  # "trainer": as selectune.trainer builds it; "foreach": the counting convention

    def step(self, i: int) -> None:
        """Training step i (1-based step number i + 1 for the method's schedule) on batch i."""
        ids, labels = (t.to(self.device) for t in self.batches[i % len(self.batches)])
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = torch.nn.functional.cross_entropy(self.model(input_ids=ids).logits.float(), labels)
        penalty = self.method.penalty()
        (loss if penalty is None else loss + penalty).backward()
        self.optimizer.step()
        self.method.after_step(i + 1)
        self.optimizer.zero_grad(set_to_none=True)
        if self.method.trainable_version != self.built_for:  # re-selection: the trainer rebuilds it too
            self.optimizer = _adamw(self.method, self.device, self.adamw_mode)
            self.built_for = self.method.trainable_version

    def count(self, i: int) -> OpCounter:
        """The operations of step i."""
        with OpCounter(self.host_tensors()) as counter:
            self.step(i)
        return counter

    def host_tensors(self) -> list[torch.Tensor]:
        """AdamW's per-parameter step counters where they stay on the host (foreach, not fused): reading
        them is host arithmetic on a GPU too."""
        return [s["step"] for s in self.optimizer.state.values()
                if isinstance(s.get("step"), torch.Tensor) and s["step"].device.type == "cpu"
                and not self.optimizer.defaults.get("fused")]


def _adamw(method: Any, device: torch.device, mode: str = "trainer") -> torch.optim.Optimizer:
    """The trainer's AdamW (fused on CPU and CUDA: timings), or foreach AdamW (operation counts: the unit the
    op budgets were set in, which a fused step would shrink to one operation per group for every method)."""
    from selectune.trainer import adamw

    groups = method.param_groups(1e-4, 0.01)
    return torch.optim.AdamW(groups, lr=1e-4, foreach=True) if mode == "foreach" else adamw(groups, 1e-4, device)


def prepare(overrides: Sequence[str], seq: int, batch: int = 32, n_batches: int = 8, device: str = "cpu",
            precision: str = "fp32", total_steps: int = 1000, seed: int = 0,
            model_path: str | None = None, adamw_mode: str = "trainer") -> StepBench:
    """Compose a train config from `overrides` (a recipe plus model=...), attach its method to the model
    and return the step harness. `model_path` replaces the model's weights folder (an offline copy, e.g.
    fp16 weights carried to another machine: loaded as fp32). SPT's probe runs here (a one-off)."""
    from selectune.backbone import load_backbone
    from selectune.commands import RunSpec
    from selectune.config import compose
    from selectune.methods import build_method
    from selectune.methods.base import ProbeBatches

    torch.manual_seed(seed)
    overrides = list(overrides) + ([f"model.name_or_path={model_path}"] if model_path else [])
    spec = RunSpec.from_config(compose("train", list(overrides)))
    backbone = load_backbone(spec.model, 2, False, None, 0)
    backbone.model.float()  # fp16-carried weights train in fp32 like the original
    budget = spec.budget.resolve(backbone.num_base_parameters, backbone.num_head_parameters)
    method = build_method(spec.method, budget)
    dev = torch.device(device)
    model = backbone.model.to(dev)
    vocab = int(getattr(model.config, "vocab_size", 30522))
    g = torch.Generator().manual_seed(1234)
    batches = [(torch.randint(min(1000, vocab // 4), vocab - 1, (batch, seq), generator=g),
                torch.randint(0, 2, (batch,), generator=g)) for _ in range(n_batches)]
    probe = ProbeBatches(lambda n: ({"input_ids": ids.to(dev), "labels": y.to(dev)} for ids, y in batches[:n]),
                         lambda logits, labels: torch.nn.functional.cross_entropy(logits, labels))
    method.attach(backbone, probe)
    method.plan(total_steps, 100)
    model.train()
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return StepBench(method, model, _adamw(method, dev, adamw_mode), batches, dev, dtype, method.trainable_version,
                     adamw_mode=adamw_mode)


def count_steps(bench: StepBench, steps: Sequence[int]) -> list[OpCounter]:
    """Run steps 0 .. max(steps) and count the listed ones (the first step builds the optimiser state)."""
    counters = []
    for i in range(max(steps) + 1):
        if i in steps:
            counters.append(bench.count(i))
        else:
            bench.step(i)
    return counters


def gather(fn: Callable[[], Any]) -> OpCounter:
    """Count the operations of one call (a helper for tests of a single function)."""
    with OpCounter() as counter:
        fn()
    return counter
