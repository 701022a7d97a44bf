"""Performance-aware KD weights of MTCM-KD: the default per-region rule and the paper's rule, with the
trackers that measure the Dice they come from (the weights scale losses; they are not losses).

**Default rule** (:func:`region_kd_weights`, :class:`RegionPerformance`). Each source of soft targets
(a teacher, or CDSFL at one level) distils each region (output channel; for label training each
class) with a weight from its held-out performance on that region *relative to the student's*:

    D        = exponential moving average over epochs (momentum 0.9, like nnU-Net's EMA pseudo-Dice)
               of the validation pseudo-Dice, tp/fp/fn summed over the epoch's validation batches
               (and over all DDP ranks) before the Dice is taken
    w[i, r]  = max_weight * clip((D_source[i, r] - D_student[r]) / margin, 0, 1)

A source no better than the student on a region gets weight exactly 0 there; no renormalisation
across sources (a poor teacher's share is not handed to the others); before the first measurement
every weight is 0 (KD stays off until it is measured).

**Paper rule** (:func:`performance_weights`, :class:`PerformanceTracker`): each teacher's
whole-tumour (WT) Dice on the training batches of one epoch, normalised to sum to 1 and scaled by a
total KD weight, one weight for every region, used in the next epoch. Difference to the reference
code (RhineLT/mtcm-kd): it averages per-batch Dice values; we accumulate tp/fp/fn over the epoch and
compute one Dice from the sums (as nnU-Net's online evaluation does). This is robust to batches with
an empty tumour and can be summed exactly across DDP ranks.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from torch import Tensor

from nnunet_kd.training.distributed import sum_over_ranks

__all__ = ["whole_tumour_channel", "whole_tumour_stats", "performance_weights", "PerformanceTracker",
           "hard_stats", "output_channel_names", "dice_from_stats", "moving_average", "region_kd_weights",
           "RegionPerformance"]


def whole_tumour_channel(regions: Optional[Sequence[Any]]) -> int:
    """Output channel of the whole tumour: the region with the most labels, 0 without regions.

    In every BraTS cohort the whole tumour holds every tumour label, and the only region beside it that
    is not inside it is a resection cavity (one label), e.g. (1, 2, 3), (2, 3), (3,), (4,) -> 0.
    """
    if not regions:
        return 0
    return max(range(len(regions)), key=lambda i: len(np.atleast_1d(regions[i])))


@torch.no_grad()
def whole_tumour_stats(logits: Tensor, target: Tensor, use_regions: bool,
                       wt_channel: int = 0) -> Tensor:
    """True/false positives and false negatives of the whole-tumour region on a batch.

    Args:
        logits: network output of the full-resolution level, (B, C, *spatial).
        target: with ``use_regions`` nnU-Net's region target (B, R, *spatial) with 0/1
            values; otherwise the integer label map (B, 1, *spatial) (or (B, *spatial)).
        use_regions: True for sigmoid region outputs: WT prediction is
            ``sigmoid(logits[:, wt_channel]) > 0.5`` and the reference ``target[:, wt_channel]``.
            False for softmax outputs: WT prediction is ``argmax != 0``, reference ``target != 0``.
        wt_channel: index of the WT region channel (regions only). In nnU-Net's BraTS
            setup the regions are ordered WT, TC, ET, so 0.

    Returns:
        float64 CPU tensor ``[tp, fp, fn]`` (no grad).
    """
    if use_regions:
        # sigmoid(x) > 0.5  <=>  x > 0; avoids the sigmoid and is exact in any dtype
        pred = logits[:, wt_channel] > 0
        ref = target[:, wt_channel] > 0.5
    else:
        if target.ndim == logits.ndim:
            if target.shape[1] != 1:
                raise ValueError(f"label target must have one channel, got shape {tuple(target.shape)}")
            target = target[:, 0]
        pred = logits.argmax(dim=1) != 0
        ref = target != 0
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(ref.shape)} do not match")
    # integer sums are exact; convert to float64 only at the end
    tp = (pred & ref).sum()
    fp = (pred & ~ref).sum()
    fn = (~pred & ref).sum()
    return torch.stack([tp, fp, fn]).to(device="cpu", dtype=torch.float64)


def performance_weights(dice: Union[Tensor, Sequence[float]], total_weight: float) -> Tensor:
    """Teacher weights proportional to their Dice, summing to ``total_weight``.

    Args:
        dice: (N,) Dice per teacher. NaN and negative values count as 0.
        total_weight: the sum of the returned weights (e.g. 0.15).

    Returns:
        float64 CPU tensor (N,). If every Dice is 0 (or NaN) the weights are uniform,
        ``total_weight / N``.
    """
    d = torch.as_tensor(dice, dtype=torch.float64).detach().cpu().flatten()
    if d.numel() == 0:
        raise ValueError("need at least one Dice value")
    d = torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    s = d.sum()
    if s <= 0:
        return torch.full_like(d, float(total_weight) / d.numel())
    return d / s * float(total_weight)


class PerformanceTracker:
    """Accumulates per-teacher whole-tumour tp/fp/fn over an epoch.

    Typical use: ``update(i, whole_tumour_stats(...))`` for each teacher every training
    iteration; at the end of the epoch ``all_reduce()`` (once!), then
    ``compute_weights(total)`` for the next epoch, then ``reset()``.

    Accumulators are float64 CPU tensors of shape (num_teachers, 3) = [tp, fp, fn].
    """

    def __init__(self, num_teachers: int) -> None:
        if num_teachers < 1:
            raise ValueError(f"num_teachers must be >= 1, got {num_teachers}")
        self.num_teachers = int(num_teachers)
        self.stats = torch.zeros(self.num_teachers, 3, dtype=torch.float64)

    def reset(self) -> None:
        """Zero all accumulators (start of an epoch)."""
        self.stats.zero_()

    def update(self, teacher_index: int, stats: Union[Tensor, Sequence[float]]) -> None:
        """Add one batch's ``[tp, fp, fn]`` (shape (3,)) to teacher ``teacher_index``."""
        if not 0 <= teacher_index < self.num_teachers:
            raise IndexError(f"teacher_index {teacher_index} out of range for {self.num_teachers} teachers")
        s = torch.as_tensor(stats, dtype=torch.float64).detach().cpu().flatten()
        if s.numel() != 3:
            raise ValueError(f"stats must be [tp, fp, fn], got {s.numel()} values")
        self.stats[teacher_index] += s

    def dice(self) -> Tensor:
        """(num_teachers,) float64 Dice = 2tp / (2tp + fp + fn); 1.0 where nothing was
        predicted and nothing was there (BraTS convention)."""
        tp, fp, fn = self.stats.unbind(dim=1)
        denom = 2 * tp + fp + fn
        return torch.where(denom > 0, 2 * tp / denom.clamp_min(1e-12), torch.ones_like(denom))

    def compute_weights(self, total_weight: float) -> Tensor:
        """(num_teachers,) float64 weights from :meth:`dice`, see :func:`performance_weights`."""
        return performance_weights(self.dice(), total_weight)

    def all_reduce(self, group: Optional[Any] = None) -> None:
        """Sum the accumulators over all DDP ranks, so every rank computes the same weights.

        A no-op when torch.distributed is unavailable or not initialised. Call it once per
        epoch (calling it twice would count the other ranks' stats twice). For NCCL the
        tensor travels through the current CUDA device; for gloo it stays on CPU.
        """
        self.stats = sum_over_ranks(self.stats, group).to(torch.float64)

    def state_dict(self) -> Dict[str, Any]:
        """Checkpointable state (CPU tensors / ints only)."""
        return {"num_teachers": self.num_teachers, "stats": self.stats.clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the teacher count must match."""
        n = int(state["num_teachers"])
        if n != self.num_teachers:
            raise ValueError(f"state has {n} teachers, tracker has {self.num_teachers}")
        stats = torch.as_tensor(state["stats"], dtype=torch.float64).cpu().clone()
        if stats.shape != (self.num_teachers, 3):
            raise ValueError(f"stats must have shape ({self.num_teachers}, 3), got {tuple(stats.shape)}")
        self.stats = stats

    def __repr__(self) -> str:
        return f"PerformanceTracker(num_teachers={self.num_teachers}, dice={self.dice().tolist()})"


# ------------------------------------------------------------------ default: per-region rule
@torch.no_grad()
def hard_stats(logits: Tensor, target: Tensor, use_regions: bool) -> np.ndarray:
    """tp, fp, fn per foreground region or label, counted as nnU-Net's pseudo Dice counts them.

    Args:
        logits: (B, C, *spatial) network output.
        target: with ``use_regions`` the region target (B, C, *spatial) of 0/1; else the label map
            (B, 1, *spatial).
        use_regions: True: prediction ``sigmoid > 0.5`` per region; False: one-hot argmax, background dropped.

    Returns:
        float64 array (3, R): R = C regions, or C - 1 labels without the background.
    """
    axes = [0] + list(range(2, logits.ndim))
    if use_regions:
        pred = (torch.sigmoid(logits.float()) > 0.5).long()
    else:
        pred = torch.zeros_like(logits, dtype=torch.float32)
        pred.scatter_(1, logits.argmax(1, keepdim=True), 1)
    tp, fp, fn, _ = get_tp_fp_fn_tn(pred, target, axes=axes)
    stats = torch.stack([tp, fp, fn]).detach().cpu().numpy().astype(np.float64)
    return stats if use_regions else stats[:, 1:]


def output_channel_names(labels: Mapping[str, Any], label_manager: Any) -> List[str]:
    """Names of the output channels (regions, or classes with the background) as dataset.json's ``labels``
    give them, for the logs; ``channel<i>`` when they cannot be matched to the channels one to one."""
    labels = {k: v for k, v in labels.items() if k != "ignore"}
    if label_manager.has_regions:
        names = [k for k, v in labels.items() if np.any(np.atleast_1d(v) != 0)]
    else:
        by_value = {int(v): k for k, v in labels.items() if np.isscalar(v)}
        names = [by_value.get(int(v), str(v)) for v in label_manager.all_labels]
    heads = label_manager.num_segmentation_heads
    return names if len(names) == heads else [f"channel{i}" for i in range(heads)]


def dice_from_stats(stats: Union[Tensor, np.ndarray]) -> Tensor:
    """Dice = 2tp / (2tp + fp + fn) per region from summed counts.

    Args:
        stats: (..., 3, R) tp, fp, fn per region.

    Returns:
        float64 CPU tensor (..., R); NaN where 2tp + fp + fn = 0 (no tumour of that region and none
        predicted: nothing was measured, so the moving average keeps its previous value).
    """
    s = torch.as_tensor(stats, dtype=torch.float64).detach().cpu()
    if s.ndim < 2 or s.shape[-2] != 3:
        raise ValueError(f"stats must have shape (..., 3, R), got {tuple(s.shape)}")
    tp, fp, fn = s.unbind(dim=-2)
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1e-12), torch.full_like(denom, float("nan")))


def moving_average(previous: Optional[Tensor], current: Tensor, momentum: float = 0.9) -> Tensor:
    """``momentum * previous + (1 - momentum) * current``, element-wise, as nnU-Net's EMA pseudo-Dice.

    (training/ema.py averages a network's weights; this averages measurements.)

    Args:
        previous: the average so far (any shape) or None before the first measurement; NaN elements
            were never measured and take ``current`` as it is.
        current: this measurement, shaped like ``previous``; a NaN (not measured this epoch) keeps
            ``previous``.
        momentum: in [0, 1).

    Returns:
        A new float64 CPU tensor shaped like ``current``.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    cur = torch.as_tensor(current, dtype=torch.float64).detach().cpu()
    if previous is None:
        return cur.clone()
    prev = torch.as_tensor(previous, dtype=torch.float64).detach().cpu()
    if prev.shape != cur.shape:
        raise ValueError(f"previous {tuple(prev.shape)} and current {tuple(cur.shape)} differ in shape")
    blended = momentum * prev + (1.0 - momentum) * cur
    return torch.where(torch.isnan(prev), cur, torch.where(torch.isnan(cur), prev, blended))


def region_kd_weights(source_dice: Union[Tensor, Sequence], student_dice: Union[Tensor, Sequence],
                      max_weight: float, margin: float) -> Tensor:
    """KD weight of each source on each region, from its Dice lead over the student (module docstring).

    Args:
        source_dice: (N, R) (or (R,)) smoothed Dice of each source (teacher, CDSFL) per region.
        student_dice: (R,) the student's smoothed Dice per region.
        max_weight: the weight of a source that leads the student by ``margin`` or more.
        margin: Dice lead (> 0) at which the weight reaches ``max_weight``; the weight grows
            linearly from 0 at no lead.

    Returns:
        float64 CPU tensor shaped like ``source_dice``:
        ``max_weight * clip((source_dice - student_dice) / margin, 0, 1)``; 0 where either Dice
        is NaN (not measured yet).
    """
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    if max_weight < 0:
        raise ValueError(f"max_weight must be >= 0, got {max_weight}")
    src = torch.as_tensor(source_dice, dtype=torch.float64).detach().cpu()
    stu = torch.as_tensor(student_dice, dtype=torch.float64).detach().cpu()
    if src.shape[-1:] != stu.shape or stu.ndim != 1:
        raise ValueError(f"source Dice {tuple(src.shape)} and student Dice {tuple(stu.shape)} do not match")
    lead = ((src - stu) / float(margin)).clamp(0.0, 1.0)
    return float(max_weight) * torch.nan_to_num(lead, nan=0.0)


class RegionPerformance:
    """Moving-average validation Dice per region of the student and of each named source.

    Every validation epoch: ``update({name: (3, R) tp/fp/fn summed over this rank's batches})`` with
    a ``"student"`` entry; the counts are summed over the DDP ranks (one all-reduce) before the Dice
    is taken, so every rank holds the same averages and derives the same weights. Then
    ``weights(names, max_weight, margin)`` gives :func:`region_kd_weights` of those sources.
    """

    STUDENT = "student"

    def __init__(self, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.ema: Dict[str, Tensor] = {}

    def update(self, stats: Mapping[str, Union[Tensor, np.ndarray]], group: Optional[Any] = None) -> Dict[str, Tensor]:
        """Sum ``stats`` ((3, R) each, float64-able) over ranks, update the averages; returns this epoch's
        (R,) Dice per name (NaN where nothing was measured)."""
        if self.STUDENT not in stats:
            raise KeyError(f"stats need a '{self.STUDENT}' entry, got {sorted(stats)}")
        names = sorted(stats)  # the same order on every rank
        local = torch.stack([torch.as_tensor(stats[n], dtype=torch.float64).detach().cpu() for n in names])
        summed = sum_over_ranks(local, group).to(torch.float64)
        epoch_dice = {n: d for n, d in zip(names, dice_from_stats(summed).unbind(0))}
        for n, d in epoch_dice.items():
            self.ema[n] = moving_average(self.ema.get(n), d, self.momentum)
        return epoch_dice

    def weights(self, names: Sequence[str], max_weight: float, margin: float, num_regions: int) -> Tensor:
        """(len(names), num_regions) float64 weights; rows of sources (or a student) never measured are 0."""
        if self.STUDENT not in self.ema:
            return torch.zeros(len(names), num_regions, dtype=torch.float64)
        nan = torch.full((num_regions,), float("nan"), dtype=torch.float64)
        source = torch.stack([self.ema.get(n, nan) for n in names]) if names else \
            torch.zeros(0, num_regions, dtype=torch.float64)
        return region_kd_weights(source, self.ema[self.STUDENT], max_weight, margin)

    def state_dict(self) -> Dict[str, Any]:
        return {"momentum": self.momentum, "ema": {n: d.clone() for n, d in self.ema.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.momentum = float(state["momentum"])
        self.ema = {n: torch.as_tensor(d, dtype=torch.float64).cpu().clone() for n, d in state["ema"].items()}
