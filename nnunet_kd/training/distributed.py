"""torch.distributed helpers for modules that nnU-Net's DDP wrapper does not cover."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import distributed as dist
from torch import nn


def is_distributed() -> bool:
    """True inside an initialised torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def sum_over_ranks(tensor: torch.Tensor, group: Optional[Any] = None) -> torch.Tensor:
    """``tensor`` summed over all ranks (a new CPU tensor of the same dtype; ``tensor`` itself outside DDP).

    The all-reduce runs on the device the backend needs (CUDA for NCCL, else CPU), so callers can keep
    their statistics on the CPU.
    """
    if not is_distributed():
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if str(dist.get_backend(group)).lower() == "nccl" \
        else torch.device("cpu")
    buffer = tensor.to(device).contiguous()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return buffer.to(device="cpu", dtype=tensor.dtype)


def max_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of a 1-D CPU tensor over all ranks (``values`` itself outside DDP)."""
    if not is_distributed():
        return values
    table = torch.zeros(dist.get_world_size(), *values.shape, dtype=values.dtype)
    table[dist.get_rank()] = values  # each rank fills its row; the sum gathers them all
    return sum_over_ranks(table).amax(0)


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Make parameters and buffers of ``module`` identical on all ranks (copied from rank ``src``)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


def average_gradients(module: nn.Module) -> None:
    """All-reduce (mean) the gradients of a module that is not wrapped in DDP, so every rank steps alike."""
    if not is_distributed():
        return
    world_size = dist.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size
