"""Response-based knowledge distillation (MTCM-KD's teacher -> student term).

Works for 2-D and 3-D outputs (any number of spatial dims) and for both of
nnU-Net's output kinds:

* region-based training (sigmoid outputs, channels are independent regions such
  as WT/TC/ET): a per-region binary (Bernoulli) KL;
* label training (softmax over classes): the usual categorical KL.

Reduction
---------
The reference implementation uses ``F.kl_div(..., reduction='batchmean')``, i.e.
the KL summed over every voxel and divided by the batch size only. On 3-D
patches of ~10^6 voxels that makes the KD term ~10^6 times larger than
nnU-Net's Dice + CE (which are per-voxel means), so the reference's relative
loss weights (0.75 seg, 0.15 KD, ...) would be meaningless. We therefore sum
over classes/regions and **average over batch and voxels**; with batch 1 and a
single voxel both reductions coincide.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["response_kd_loss", "binary_kl_from_logits", "ResponseKDLoss"]


def binary_kl_from_logits(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Element-wise KL(Bern(sigmoid(t)) || Bern(sigmoid(s))), computed from logits.

    Args:
        teacher_logits: (B, R, *spatial), already divided by the temperature.
        student_logits: same shape as ``teacher_logits``.

    Returns:
        Tensor of the same shape, KL per region and voxel (>= 0 up to rounding).
    """
    # log(p) = logsigmoid(x), log(1 - p) = logsigmoid(-x): no log(0) for saturated logits.
    log_p, log_1mp = F.logsigmoid(teacher_logits), F.logsigmoid(-teacher_logits)
    log_q, log_1mq = F.logsigmoid(student_logits), F.logsigmoid(-student_logits)
    p = torch.sigmoid(teacher_logits)
    return p * (log_p - log_q) + (1.0 - p) * (log_1mp - log_1mq)


def response_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    use_regions: bool,
    temperature_power: int = 1,
) -> Tensor:
    """Temperature-scaled KL(teacher || student) on raw network outputs.

    Args:
        student_logits: (B, C, *spatial) logits of the student (receives the gradient).
        teacher_logits: (B, C, *spatial) logits of the teacher; detached here, so no
            gradient ever flows into the teacher.
        temperature: T > 0; both logits are divided by T before the KL.
        use_regions: True for nnU-Net region-based (sigmoid) outputs: per-region binary
            KL summed over the C regions. False for softmax outputs: categorical KL
            summed over the C classes.
        temperature_power: the result is multiplied by ``T ** temperature_power``. The
            MTCM-KD reference uses T (power 1); Hinton's gradient-preserving scaling is
            T^2 (power 2).

    Returns:
        0-dim float32 tensor: KL summed over channels, averaged over batch and voxels
        (not the reference's 'batchmean', which sums over voxels and would make the
        term ~10^6 times nnU-Net's Dice + CE on 3-D patches; see module docstring).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.ndim < 2:
        raise ValueError(f"expected (B, C, *spatial) logits, got shape {tuple(student_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    # Under autocast, exp/log in half precision lose the small probability differences
    # the KL is made of: compute in float32 with autocast switched off.
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        s = student_logits.float() / temperature
        t = teacher_logits.detach().float() / temperature
        if use_regions:
            kl = binary_kl_from_logits(t, s)
        else:
            kl = F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1),
                          reduction="none", log_target=True)
        # sum over channels, mean over batch and all spatial positions
        loss = kl.sum(dim=1).mean()
        return loss * (float(temperature) ** temperature_power)


class ResponseKDLoss(nn.Module):
    """Module wrapper of :func:`response_kd_loss`.

    forward(student_logits (B, C, *spatial), teacher_logits (B, C, *spatial)) -> 0-dim
    float32 tensor. The teacher is detached inside.
    """

    def __init__(self, temperature: float = 20.0, temperature_power: int = 1,
                 use_regions: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.temperature_power = int(temperature_power)
        self.use_regions = bool(use_regions)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return response_kd_loss(student_logits, teacher_logits, self.temperature,
                                self.use_regions, self.temperature_power)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, temperature_power={self.temperature_power}, "
                f"use_regions={self.use_regions}")
