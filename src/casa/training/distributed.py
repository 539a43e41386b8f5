"""Distributed training set-up: which rank this process is, and the few collectives the trainer needs.

Design decisions:
- `torchrun` is the launcher: a process joins a process group only when
  `WORLD_SIZE > 1` is in its environment (gloo on CPU, nccl on CUDA);
  otherwise everything here is a no-op for one process, so the trainer has a
  single code path.
- The trainer needs only three collectives: a sum (loss, the stop flag every
  rank must agree on), an all-gather of Python objects (every rank's RNG
  state for the checkpoint) and a barrier (after rank 0 saved).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "all_gather_objects", "all_sum", "barrier", "setup_distributed", "shutdown"]


@dataclass
class Dist:
    """This process's place: `rank` of `world` processes, `local_rank` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs and writes checkpoints."""
        return self.rank == 0


def setup_distributed(device_kind: str) -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """`x` summed over every rank, in place (any shape and float dtype); `x` itself for one process."""
    if d.world > 1:
        dist.all_reduce(x)
    return x


def all_gather_objects(obj, d: Dist) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank; `[obj]` for one process."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    """Wait for every rank (no-op for one process)."""
    if d.world > 1:
        dist.barrier()


def shutdown(d: Dist, *, wait: bool = True) -> None:
    """Leave the process group, if this process joined one. `wait=False` (after an error) skips the
    barrier: a peer that died would hold it for gloo's whole timeout."""
    if d.world > 1 and dist.is_initialized():
        if wait:
            # Wait for every rank first: a rank that tears down its gloo pairs while a peer is still
            # in a collective (or still reading from it) can make that peer abort with SIGABRT.
            dist.barrier()
        dist.destroy_process_group()
