"""Exponential moving average of a network's weights: MGSD's momentum teacher (and the EMA target heads of
its modality-level term), with the mean-teacher warm-up of the momentum."""
from __future__ import annotations

import torch
from torch import nn

from nnunet_kd.training.features import unwrap_network

__all__ = ["ema_update", "warmed_up_momentum"]


def warmed_up_momentum(step: int, momentum: float) -> float:
    """Mean-teacher warm-up of the EMA momentum: ``min(momentum, 1 - 1 / (step + 1))``.

    ``step`` counts the EMA updates made before this one (0 for the first), so the first update
    copies the network (momentum 0), the second averages the two (0.5), and so on until the
    configured ``momentum`` is reached (at step 99 for 0.99). Without it, at momentum 0.99 about
    40 % of the teacher is still the random initial network after 90 steps (0.99^90 = 0.40).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return min(float(momentum), 1.0 - 1.0 / (step + 1))


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, momentum: float, ema_buffers: bool = False) -> None:
    """In-place EMA of ``model`` into ``ema_model``.

    Floating parameters: ``ema_p = momentum * ema_p + (1 - momentum) * p``
    (momentum 0 copies, momentum 1 keeps; both are done exactly, without arithmetic).
    Non-floating parameters are copied.
    Buffers: copied (default; e.g. BatchNorm running statistics follow the student),
    or, with ``ema_buffers=True``, floating buffers are averaged like parameters.
    Integer buffers such as ``num_batches_tracked`` are always copied.

    Either module may be wrapped (DDP, DataParallel, torch.compile): both are
    unwrapped first, so the usual ``ema = deepcopy(unwrapped_network)`` paired with
    the (possibly wrapped) training network works. Parameter and buffer names of the
    unwrapped modules must match (ValueError otherwise).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    ema_model, model = unwrap_network(ema_model), unwrap_network(model)
    ema_params, params = dict(ema_model.named_parameters()), dict(model.named_parameters())
    ema_bufs, bufs = dict(ema_model.named_buffers()), dict(model.named_buffers())
    if ema_params.keys() != params.keys() or ema_bufs.keys() != bufs.keys():
        raise ValueError("ema_model and model have different parameter/buffer names")

    def _blend(dst: torch.Tensor, src: torch.Tensor) -> None:
        if dst.shape != src.shape:
            raise ValueError(f"shape mismatch: {tuple(dst.shape)} vs {tuple(src.shape)}")
        src = src.detach().to(device=dst.device, dtype=dst.dtype)
        if not dst.is_floating_point() or momentum == 0.0:
            dst.copy_(src)
        elif momentum != 1.0:
            # Written as the formula (two products and a sum), so it matches a manual computation exactly.
            dst.copy_(dst * momentum + src * (1.0 - momentum))

    for name, p in params.items():
        _blend(ema_params[name], p)
    for name, b in bufs.items():
        if ema_buffers and ema_bufs[name].is_floating_point():
            _blend(ema_bufs[name], b)
        else:
            if ema_bufs[name].shape != b.shape:
                raise ValueError(f"buffer {name}: shape mismatch {tuple(ema_bufs[name].shape)} vs {tuple(b.shape)}")
            ema_bufs[name].copy_(b.detach())
