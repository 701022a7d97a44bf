"""The MTCM-KD student's loss (Ahmad, Ullah, Gwak, Knowledge-Based Systems 297 (2024) 111854), split into
the terms whose gradient shares the trainer logs.

Once KD is on (docs/methods.md)::

    supervised  = seg_weight * seg(out, target) + ds_weight * ds_seg_fraction * sum_l seg_l(out[l], target[l])
    response_kd = ramp * sum_i KD(out[0], teacher_i[0]; w_i)
    cdsfl_kd    = ramp * ds_weight * ds_kd_fraction * sum_l KD(out[l], fused[l]; v_l)

with l over the CDSFL levels. ``w_i`` is teacher i's weight: one number for every region (the paper's
rule) or one weight per output channel, shape (C,) (the default, per-region rule); ``v_l`` is 1 or a
(C,) factor per channel for CDSFL at level l; ``ramp`` (training/schedules.py, ``kd_rampup``) grows
linearly from the epoch KD starts. Before KD starts the student learns from the ground truth alone with nnU-Net's
deep-supervised segmentation loss at weight 1.0, as the reference code does.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["STUDENT_TERMS", "student_loss_terms"]

#: Weighted terms of the student loss, in logging order.
STUDENT_TERMS = ("supervised", "response_kd", "cdsfl_kd")

#: A KD weight: one number for all channels, or a (C,) tensor with one weight per output channel.
KDWeight = Union[float, Tensor]


def _weighted_kd(kd: Callable[..., Tensor], student: Tensor, teacher: Tensor, weight: KDWeight) -> Optional[Tensor]:
    """``weight * KD`` for a number, KD with channel weights for a (C,) tensor; None when the weight is 0
    everywhere (that term is skipped: no teacher gradient is wasted on it)."""
    if torch.is_tensor(weight) and weight.ndim > 0:
        return kd(student, teacher, weight) if bool((weight != 0).any()) else None
    return float(weight) * kd(student, teacher) if float(weight) != 0 else None


def student_loss_terms(student_out: Sequence[Tensor], teacher_outputs: Sequence[Sequence[Tensor]],
                       fused: Mapping[int, Tensor], target: Sequence[Tensor], *, seg_loss: nn.Module,
                       kd: Callable[..., Tensor], kd_weights: Sequence[KDWeight],
                       levels: Sequence[int], kd_active: bool, seg_weight: float, ds_weight: float,
                       ds_seg_fraction: float, ds_kd_fraction: float, kd_scale: float = 1.0,
                       cdsfl_kd_weights: Optional[Mapping[int, KDWeight]] = None) -> Dict[str, Tensor]:
    """The weighted student terms, keyed by :data:`STUDENT_TERMS` names; their sum is the student loss.

    Args:
        student_out, target: deep-supervision lists, (B, C, *s_l) per level.
        teacher_outputs: one such list per teacher (only level 0 is used).
        fused: CDSFL logits per level in ``levels``, (B, C, *s_l).
        seg_loss: nnU-Net's deep-supervision wrapper (``seg_loss.loss`` is the single-level loss).
        kd: :class:`~nnunet_kd.losses.kd.ResponseKD` (or any ``kd(student, teacher[, channel_weights])``).
        kd_weights: per teacher a number (paper rule) or a (C,) tensor of channel weights.
        kd_scale: the ramp factor on both KD terms (training/schedules.py, ``kd_rampup``).
        cdsfl_kd_weights: per level a factor or (C,) channel factors on the CDSFL KD; None: 1.

    Returns:
        0-dim tensors (a KD term whose weights are all 0 is the number 0). Before KD starts only
        ``"supervised"``, nnU-Net's loss at weight 1.0.
    """
    if not kd_active:
        return {"supervised": seg_loss(student_out, target)}
    supervised = seg_weight * seg_loss(student_out, target)
    if ds_weight * ds_seg_fraction:
        supervised = supervised + sum(ds_weight * ds_seg_fraction * seg_loss.loss(student_out[lvl], target[lvl])
                                      for lvl in levels)
    response = [_weighted_kd(kd, student_out[0], t_out[0], w) for w, t_out in zip(kd_weights, teacher_outputs)]
    cdsfl_weights = cdsfl_kd_weights or {}
    cdsfl = [_weighted_kd(kd, student_out[lvl], fused[lvl], cdsfl_weights.get(lvl, 1.0)) for lvl in levels]
    return {"supervised": supervised,
            "response_kd": kd_scale * sum(r for r in response if r is not None),
            "cdsfl_kd": kd_scale * ds_weight * ds_kd_fraction * sum(c for c in cdsfl if c is not None)}
