"""Multi-process training on PyTorch's own engine: torchrun + DistributedDataParallel.

    torchrun --nproc_per_node=N -m selectune train recipe=... out_dir=runs/x

gloo on CPU, nccl on GPU (one device per local rank). Each rank takes rows rank, rank+N, ... of every
global batch (trainer.batch_size stays the global batch), its loss is scaled so DDP's gradient mean
equals the single-process gradient of the whole batch, and only rank 0 writes files or prints.
Method state that must agree does: DDP broadcasts rank 0's parameters and buffers (masks, index
sets, allocations) whenever it wraps the model, gradients — and so AdaLoRA's importance — are
all-reduced, probe gradients are averaged before squaring, and diff pruning's noise differs per rank
(each rank seeds its own stream) while α and w stay synchronised. At the end the ranks check that
every parameter and buffer matches rank 0's.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from selectune.errors import SelectuneError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, rows: list[int]) -> list[int]:
        """This rank's rows of a global batch."""
        return rows[self.rank::self.world]

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor)
            tensor /= self.world
        return tensor

    def sum(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    def gather(self, obj):
        """Every rank's `obj`, in rank order (on every rank)."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def in_sync(self, module: torch.nn.Module) -> bool:
        """Whether every parameter and buffer equals rank 0's (bitwise)."""
        if not self.active:
            return True
        equal = torch.ones(1)
        for tensor in [*module.parameters(), *module.buffers()]:
            reference = tensor.detach().clone()
            dist.broadcast(reference, 0)
            if not torch.equal(reference, tensor.detach()):
                equal.zero_()
        dist.all_reduce(equal, op=dist.ReduceOp.MIN)
        return bool(equal.item())


def setup(device_name: str) -> Context:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a single process gets Context()."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return Context(dist.get_rank(), dist.get_world_size(), local_rank)


def finish() -> None:
    """End a torchrun worker: leave the process group together, then exit without the interpreter's
    teardown (a single process returns; nothing to do).

    Without the barrier a rank that is done first tears gloo down while another still writes. Even
    after destroy_process_group, gloo's transport threads can still be joinable when C++ static objects
    are destroyed at exit: under load the launch then ended in SIGABRT ("terminate called without an
    active exception") after every run had succeeded (seen in the test suite beside two training runs,
    with the barrier in place). os._exit skips that teardown; logs and streams are flushed first, and
    every file a run writes is closed before its `train` returns."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def device_for(ctx: Context, device: torch.device) -> torch.device:
    if ctx.active and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def check_out_dir(ctx: Context, explicit: bool) -> None:
    if ctx.active and not explicit:
        raise SelectuneError("with torchrun every rank must write to the same run: pass out_dir=<dir> "
                             "(the default folder name holds each rank's own clock)")
