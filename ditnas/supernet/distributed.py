"""Data-parallel supernet training under `torchrun` (DDP semantics, without the DDP wrapper).

Every rank draws the same global batch and the same subnets from the same seeded RNGs, trains on its
shard of the batch (rank r takes rows r*b .. (r+1)*b of B = world*b), and the gradients of all the step's
backward passes (max net + sampled subnets) are averaged across ranks in ONE all-reduce before the
optimiser step. Shards are equal, so the averaged gradient is the gradient of the global-batch loss:
a world of N ranks follows the single-process run with the same global batch up to float summation
order. Rank 0 writes checkpoints, logs and samples; every rank restores the same checkpoint.

Why not `DistributedDataParallel`: each step runs several different subnets through one module and
leaves different parameters without gradients, which DDP handles with `find_unused_parameters` and one
reduction per backward; one flat all-reduce per step is simpler and cheaper here.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ditnas.errors import ConfigFieldError, DitnasError


@dataclass(frozen=True)
class Group:
    """This process's place in the run: rank / world size (1 = not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """This rank's rows of each global-batch tensor."""
        if not self.active:
            return tensors
        n = tensors[0].shape[0] // self.world
        return tuple(t[self.rank * n:(self.rank + 1) * n] for t in tensors)

    def average_gradients(self, params) -> None:
        """Replace every gradient by its mean over ranks: one flat all-reduce. Ranks train the same subnets,
        so the same parameters hold gradients on every rank (checked by the element count)."""
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads]) if grads else torch.zeros(0)
        count = torch.tensor([flat.numel()], dtype=torch.int64, device=flat.device)
        high = count.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if int(high) != int(count):
            raise DitnasError(f"rank {self.rank} holds {int(count)} gradient values, another rank {int(high)}: the ranks "
                              "trained different subnets (their sampler RNGs diverged); rerun with the same config on every rank")
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def mean(self, values: list[float], device: torch.device) -> list[float]:
        """The mean over ranks of a few scalars (logged losses, attentive-sampler scores)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def check_same(self, what: str, text: str, device: torch.device) -> None:
        """Refuse to go on when `text` (a digest of weights, the subnets of a step) differs between ranks."""
        if not self.active:
            return
        value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
        mine = torch.tensor([value], dtype=torch.int64, device=device)
        low, high = mine.clone(), mine.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if int(low) != int(high):
            raise DitnasError(f"ranks disagree on {what}: every rank must start from the same config, data and "
                              "checkpoint (launch all of them with the same command and --out)")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def env_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    except ValueError as exc:
        raise DitnasError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc}); launch with torchrun") from None


def join(device: torch.device, batch_size: int) -> Group:
    """The process group of this run: joined here when torchrun started several ranks (gloo on CPU,
    nccl on CUDA), else a single-process group. The global batch must split evenly over the ranks."""
    rank, world, local = env_ranks()
    if world <= 1:
        return Group()
    if batch_size % world:
        raise ConfigFieldError("train.batch_size", f"{batch_size} does not split over {world} ranks (torchrun "
                               f"--nproc-per-node x nodes); use a multiple of {world}, e.g. {batch_size - batch_size % world or world}")
    here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        here = True
    return Group(rank=rank, world=world, local_rank=local, initialized_here=here)
