"""``torch.distributed`` helpers for data-parallel SAE training (launch with ``torchrun``).

Each process reads the same global batch from its data source and trains on its own slice of
rows; losses are shares of a global loss (see :mod:`saes.losses`), so summing gradients over
processes (one ``all_reduce`` per parameter) gives exactly the single-process gradient on the
whole global batch. gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device) -> tuple[int, int]:
    """Join the process group named by torchrun's environment (no-op on one process).
    Returns ``(rank, world_size)``."""
    if env_world_size() <= 1 and not dist.is_initialized():
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def allsum(t: Tensor) -> Tensor:
    """Sum a tensor over processes (returns a new tensor; identity on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def allsum_grads(params) -> None:
    """Sum every parameter's gradient over processes in place."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective; also handles strided grads
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view(g.shape))
        offset += n


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def local_rows(x: Tensor, rank: int, world: int) -> Tensor:
    """This process's contiguous share of a global batch's rows."""
    if world == 1:
        return x
    n = x.shape[0]
    lo, hi = n * rank // world, n * (rank + 1) // world
    return x[lo:hi]
