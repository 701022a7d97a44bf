"""Response-based knowledge distillation (MTCM-KD's teacher -> student term).

Works for 2-D and 3-D outputs (any number of spatial dims) and for both of
nnU-Net's output kinds:

* region-based training (sigmoid outputs, channels are independent regions such
  as WT/TC/ET): a per-region binary (Bernoulli) KL;
* label training (softmax over classes): the usual categorical KL.

Reduction
---------
``"mean"`` (the default): KL summed over classes/regions, **averaged over batch and
voxels**, like nnU-Net's Dice + CE, so the term's size does not depend on the patch.
``"batchmean"``: the reference implementation's ``F.kl_div(..., reduction='batchmean')``,
the KL summed over every voxel and divided by the batch size only; on 3-D patches of
~10^5-10^6 voxels it is that many times the per-voxel mean. Kept for the reference
variant; with batch 1 and a single voxel both reductions coincide.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["response_kd_loss", "binary_kl_from_logits", "KD_REDUCTIONS"]

#: Reductions of :func:`response_kd_loss` over batch and voxels.
KD_REDUCTIONS = ("mean", "batchmean")


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
    reduction: str = "mean",
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
        reduction: ``"mean"``: KL summed over channels, averaged over batch and voxels;
            ``"batchmean"``: summed over channels and voxels, divided by the batch size
            (the reference's; see module docstring).

    Returns:
        0-dim float32 tensor.
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
    if reduction not in KD_REDUCTIONS:
        raise ValueError(f"KD reduction must be one of {KD_REDUCTIONS}, got {reduction!r}")

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
        per_voxel = kl.sum(dim=1)  # (B, *spatial)
        loss = per_voxel.mean() if reduction == "mean" else per_voxel.sum() / per_voxel.shape[0]
        return loss * (float(temperature) ** temperature_power)
