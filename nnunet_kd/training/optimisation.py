"""nnU-Net's optimisation recipe for networks beside ``trainer.network``: SGD with poly decay, clipping, and
one backward + step over several optimisers (with nnU-Net's grad scaler). Autocast: training/precision.py."""
from __future__ import annotations

from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from nnunet_kd.training.distributed import average_gradients


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float = 12.0) -> Optional[torch.Tensor]:
    """nnU-Net's gradient clipping (norm 12), applied to one network's parameters.

    Returns the total gradient norm before clipping (a 0-dim tensor on the gradients' device, not synced to
    the host), or None when no parameter has a gradient. The applied scale is min(1, max_norm / norm).
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return None
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def sgd_with_poly_lr(parameters: Iterable[torch.nn.Parameter], trainer: Any) -> Tuple[torch.optim.SGD, Any]:
    """nnU-Net's optimiser and schedule (SGD, Nesterov 0.99, poly decay) for auxiliary networks."""
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

    optimizer = torch.optim.SGD(list(parameters), trainer.initial_lr, weight_decay=trainer.weight_decay,
                                momentum=0.99, nesterov=True)
    return optimizer, PolyLRScheduler(optimizer, trainer.initial_lr, trainer.num_epochs)


def backward_and_step(loss: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer],
                      networks: Sequence[nn.Module], grad_scaler: Optional[torch.amp.GradScaler] = None,
                      unsynced: Sequence[nn.Module] = (), max_norm: float = 12.0,
                      max_norms: Optional[Sequence[float]] = None) -> List[Optional[torch.Tensor]]:
    """nnU-Net's mixed-precision backward, clipping (per network) and step, for several optimisers at once.

    ``unsynced``: modules outside DDP whose gradients are averaged over ranks before clipping.
    ``max_norms``: one clipping norm per network (default: ``max_norm`` for all).
    Returns each network's gradient norm before clipping (see :func:`clip_gradients`; non-finite on steps the
    grad scaler skips).
    """
    if max_norms is None:
        max_norms = [max_norm] * len(networks)
    if len(max_norms) != len(networks):
        raise ValueError(f"max_norms has {len(max_norms)} entries for {len(networks)} networks")
    if grad_scaler is not None:
        grad_scaler.scale(loss).backward()
        for opt in optimizers:
            grad_scaler.unscale_(opt)
    else:
        loss.backward()
    for module in unsynced:
        average_gradients(module)
    norms = [clip_gradients(net.parameters(), limit) for net, limit in zip(networks, max_norms)]
    for opt in optimizers:
        if grad_scaler is not None:
            grad_scaler.step(opt)
        else:
            opt.step()
    if grad_scaler is not None:
        grad_scaler.update()
    return norms
