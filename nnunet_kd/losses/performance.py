"""Performance-aware teacher weights for MTCM-KD.

Each teacher's whole-tumour (WT) Dice on the training batches of one epoch is
turned into its KD weight for the next epoch: the Dice values are normalised to
sum to 1 and scaled by a total KD weight.

Difference to the reference: the reference averages per-batch Dice values; we
accumulate tp/fp/fn over the epoch and compute one Dice from the sums (as
nnU-Net's online evaluation does). This is robust to batches with an empty
tumour and can be summed exactly across DDP ranks.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from nnunet_kd.training.distributed import sum_over_ranks

__all__ = ["whole_tumour_channel", "whole_tumour_stats", "performance_weights", "PerformanceTracker"]


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
