"""Response-based knowledge distillation: MTCM-KD's teacher -> student term (Ahmad, Ullah, Gwak,
Knowledge-Based Systems 297 (2024) 111854; reference code: github.com/RhineLT/mtcm-kd, a public fork of
the authors' repository).

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

Per-channel weights
-------------------
``channel_weights`` (C,) weights each output channel's KL separately (MTCM-KD's default: a teacher
distils only the regions it is better at). For regions this is the per-region Bernoulli KL times
its weight. For label training the categorical KL cannot be split by class (weighting its per-class
terms ``p_c log(p_c / q_c)`` moves the student's optimum to ``q ∝ w p``, so a class of weight 0
would be pushed to probability 0); instead each class's softmax probability is distilled as a
one-vs-rest Bernoulli KL, ``KL(Bern(p_c) || Bern(q_c))``, times its weight: each term is >= 0 and
0 only when the student matches that class's probability. Without weights the loss is the plain
(unweighted) KL above.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["response_kd_loss", "ResponseKD", "binary_kl_from_logits", "one_vs_rest_kl_from_logits",
           "KD_REDUCTIONS"]

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
    return _bernoulli_kl(F.logsigmoid(teacher_logits), F.logsigmoid(-teacher_logits),
                         F.logsigmoid(student_logits), F.logsigmoid(-student_logits))


def _bernoulli_kl(log_p: Tensor, log_1mp: Tensor, log_q: Tensor, log_1mq: Tensor) -> Tensor:
    """KL(Bern(p) || Bern(q)) element-wise, from log p, log(1 - p), log q, log(1 - q)."""
    p = log_p.exp()
    return p * (log_p - log_q) + (1.0 - p) * (log_1mp - log_1mq)


def one_vs_rest_kl_from_logits(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Per class c, KL(Bern(p_c) || Bern(q_c)) of the teacher's softmax probabilities p and the student's q.

    Args:
        teacher_logits, student_logits: (B, C, *spatial) each, already divided by the temperature.

    Returns:
        (B, C, *spatial): the KL of each class at each voxel (>= 0 up to rounding).
    """
    log_p, log_q = F.log_softmax(teacher_logits, dim=1), F.log_softmax(student_logits, dim=1)
    # log(1 - p) = log(-expm1(log p)), accurate near p = 1; clamped so a saturated p = 1 stays finite.
    tiny = torch.finfo(log_p.dtype).tiny
    log_1mp = torch.log((-torch.expm1(log_p)).clamp_min(tiny))
    log_1mq = torch.log((-torch.expm1(log_q)).clamp_min(tiny))
    return _bernoulli_kl(log_p, log_1mp, log_q, log_1mq)


def response_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    use_regions: bool,
    temperature_power: int = 1,
    reduction: str = "mean",
    channel_weights: Optional[Union[Tensor, Sequence[float]]] = None,
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
        channel_weights: optional (C,) weight per output channel (module docstring, "Per-channel
            weights"): per-region Bernoulli KL times its weight for regions, per-class one-vs-rest
            Bernoulli KL times its weight for labels. None: the unweighted KL.

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
        if channel_weights is not None:
            w = torch.as_tensor(channel_weights, dtype=torch.float32, device=s.device).flatten()
            if w.numel() != s.shape[1]:
                raise ValueError(f"channel_weights has {w.numel()} values for {s.shape[1]} channels")
            kl = binary_kl_from_logits(t, s) if use_regions else one_vs_rest_kl_from_logits(t, s)
            kl = kl * w.view(1, -1, *([1] * (s.ndim - 2)))
        elif use_regions:
            kl = binary_kl_from_logits(t, s)
        else:
            kl = F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1),
                          reduction="none", log_target=True)
        per_voxel = kl.sum(dim=1)  # (B, *spatial)
        loss = per_voxel.mean() if reduction == "mean" else per_voxel.sum() / per_voxel.shape[0]
        return loss * (float(temperature) ** temperature_power)


@dataclass(frozen=True)
class ResponseKD:
    """One setting of :func:`response_kd_loss` (a trainer's KD attributes), called like the loss.

    Args:
        temperature: T > 0.
        temperature_power: the loss is multiplied by ``T ** temperature_power``.
        reduction: one of :data:`KD_REDUCTIONS`.
        use_regions: sigmoid (region) outputs instead of softmax.
    """

    temperature: float
    temperature_power: int
    reduction: str
    use_regions: bool

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"KD temperature must be > 0, got {self.temperature}")
        if self.reduction not in KD_REDUCTIONS:
            raise ValueError(f"KD reduction must be one of {KD_REDUCTIONS}, got {self.reduction!r}")

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor,
                 channel_weights: Optional[Tensor] = None) -> Tensor:
        """Args: student and teacher logits (B, C, *spatial), optional (C,) channel weights. Returns: 0-dim
        loss; the teacher's logits get no gradient."""
        return response_kd_loss(student_logits, teacher_logits, self.temperature, self.use_regions,
                                self.temperature_power, self.reduction, channel_weights)
