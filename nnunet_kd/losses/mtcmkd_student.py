"""The MTCM-KD student's loss, split into the terms whose gradient shares the trainer logs.

Once KD is on (docs/methods.md)::

    supervised  = seg_weight * seg(out, target) + ds_weight * ds_seg_fraction * sum_l seg_l(out[l], target[l])
    response_kd = sum_i w_i * KD(out[0], teacher_i[0])
    cdsfl_kd    = ds_weight * ds_kd_fraction * sum_l KD(out[l], fused[l])

with l over the CDSFL levels. Before KD starts the student learns from the ground truth alone with
nnU-Net's deep-supervised segmentation loss at weight 1.0, as the reference code does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Sequence

from torch import Tensor, nn

from nnunet_kd.losses.kd import KD_REDUCTIONS, response_kd_loss

__all__ = ["STUDENT_TERMS", "ResponseKD", "student_loss_terms"]

#: Weighted terms of the student loss, in logging order.
STUDENT_TERMS = ("supervised", "response_kd", "cdsfl_kd")


@dataclass(frozen=True)
class ResponseKD:
    """One setting of the response KD: KL(teacher || student) at ``temperature``, times
    ``temperature ** temperature_power``, reduced over voxels by ``reduction`` (see losses/kd.py)."""

    temperature: float
    temperature_power: int
    reduction: str
    use_regions: bool

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"KD temperature must be > 0, got {self.temperature}")
        if self.reduction not in KD_REDUCTIONS:
            raise ValueError(f"KD reduction must be one of {KD_REDUCTIONS}, got {self.reduction!r}")

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """(B, C, *spatial) logits each -> 0-dim loss; the teacher's logits get no gradient."""
        return response_kd_loss(student_logits, teacher_logits, self.temperature, self.use_regions,
                                self.temperature_power, self.reduction)


def student_loss_terms(student_out: Sequence[Tensor], teacher_outputs: Sequence[Sequence[Tensor]],
                       fused: Mapping[int, Tensor], target: Sequence[Tensor], *, seg_loss: nn.Module,
                       kd: Callable[[Tensor, Tensor], Tensor], kd_weights: Sequence[float],
                       levels: Sequence[int], kd_active: bool, seg_weight: float, ds_weight: float,
                       ds_seg_fraction: float, ds_kd_fraction: float) -> Dict[str, Tensor]:
    """The weighted student terms, keyed by :data:`STUDENT_TERMS` names; their sum is the student loss.

    ``student_out``/``target``: deep-supervision lists, (B, C, *s_l) per level; ``teacher_outputs``: one
    such list per teacher (only level 0 is used); ``fused``: CDSFL logits per level in ``levels``;
    ``seg_loss``: nnU-Net's deep-supervision wrapper (``seg_loss.loss`` is the single-level loss);
    ``kd_weights``: one weight per teacher. Before KD starts only ``"supervised"`` is returned.
    """
    if not kd_active:
        return {"supervised": seg_loss(student_out, target)}
    supervised = seg_weight * seg_loss(student_out, target) + sum(
        ds_weight * ds_seg_fraction * seg_loss.loss(student_out[lvl], target[lvl]) for lvl in levels)
    response = sum(w * kd(student_out[0], t_out[0]) for w, t_out in zip(kd_weights, teacher_outputs))
    cdsfl = sum(ds_weight * ds_kd_fraction * kd(student_out[lvl], fused[lvl]) for lvl in levels)
    return {"supervised": supervised, "response_kd": response, "cdsfl_kd": cdsfl}
