"""Reductions under torch.distributed (2 gloo processes on the CPU): ranks end up with identical state."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nnunet_kd.training.ema import ema_update
from nnunet_kd.training.distributed import average_gradients, broadcast_module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # different initial weights on each rank
        module = nn.Linear(3, 2)
        broadcast_module(module)
        ema = nn.Linear(3, 2)
        broadcast_module(ema)
        # different data on each rank, as in DDP training
        loss = module(torch.full((4, 3), float(rank + 1))).sum()
        loss.backward()
        average_gradients(module)
        with torch.no_grad():
            for p in module.parameters():
                p -= 0.1 * p.grad
        ema_update(ema, module, 0.9)
        results[rank] = {"weights": [p.detach().clone() for p in module.parameters()],
                         "grads": [p.grad.clone() for p in module.parameters()],
                         "ema": [p.detach().clone() for p in ema.parameters()]}
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_broadcast_average_gradients_and_ema_agree_across_ranks():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
    r0, r1 = results[0], results[1]
    for key in ("weights", "grads", "ema"):
        for a, b in zip(r0[key], r1[key]):
            assert torch.equal(a, b), key
    # the averaged weight gradient is the mean of rank 0's (inputs 1) and rank 1's (inputs 2): 4 * 1.5 per row
    assert torch.allclose(r0["grads"][0], torch.full((2, 3), 6.0))
