"""Cooperative deep supervision fusion learning (CDSFL) of MTCM-KD (Ahmad, Ullah, Gwak, Knowledge-Based
Systems 297 (2024) 111854; reference code: github.com/RhineLT/mtcm-kd, models/cooperative_learning.py).

The fusion head exists only for this loss and is trained by it, so it lives beside it.

At a decoder level below full resolution each teacher's features pass through
their own CBAM channel gate and their own 1x1(x1) conv to the number of outputs;
the per-teacher maps are summed and passed through one more 1x1(x1) conv. The
fused output is supervised with the (downsampled) ground truth; since that loss
back-propagates into every teacher, the teachers learn from each other.

Works for 2-D and 3-D features: pass ``conv_op=nn.Conv2d`` / ``nn.Conv3d``
(nnU-Net's ``plans_manager``/network ``conv_op``).

Head and teachers at different weights (:func:`fuse_with_detached_copy`, :func:`cdsfl_seg_loss`): in
the paper the fused loss enters the teacher loss at 0.08, so the fusion head itself learns at 0.08 only
and stays poor. MTCM-KD's default lets the head learn at full weight while the teachers still get
exactly the paper's 0.08 share of that loss: the head runs once on the teachers' features and once on a
detached copy (one forward on the two stacked along the batch, so one DDP call); the loss is
``w * seg(fused) + (1 - w) * seg(fused_from_detached)``. Both outputs hold the same values, so the
head's gradient is that of ``1.0 * seg`` and the teachers' that of ``w * seg``. Every CDSFL operation
acts per sample (pooling, MLP, 1x1 convs), so stacking does not mix the two copies; the cost is one
extra pass of the (small) head on half-resolution features.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["ChannelGate", "CDSFLFusion", "CDSFL", "fuse_with_detached_copy", "cdsfl_seg_loss"]


class ChannelGate(nn.Module):
    """CBAM channel attention: x * sigmoid(MLP(avgpool(x)) + MLP(maxpool(x))).

    Pooling is over all spatial dims, so it works for any dimensionality.
    Shapes: (B, C, *spatial) -> (B, C, *spatial).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        # shared MLP for both descriptors (as in CBAM)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim < 3:
            raise ValueError(f"expected (B, C, *spatial) features, got shape {tuple(x.shape)}")
        spatial = tuple(range(2, x.ndim))
        avg = x.mean(dim=spatial)
        mx = x.amax(dim=spatial)
        gate = torch.sigmoid(self.mlp(avg) + self.mlp(mx))  # (B, C), in (0, 1)
        return x * gate.view(*gate.shape, *([1] * len(spatial)))


class CDSFLFusion(nn.Module):
    """Fuses the teachers' decoder features of one deep-supervision level.

    Args:
        teacher_channels: feature channels C_i of each teacher at this level.
        num_outputs: output channels (regions or classes, as the segmentation head).
        conv_op: ``nn.Conv3d`` for 3-D, ``nn.Conv2d`` for 2-D.
        reduction: channel-gate MLP reduction.

    forward(teacher_features: sequence of (B, C_i, *spatial)) -> (B, num_outputs, *spatial)
    logits, to be supervised with the ground truth at this level.
    """

    def __init__(self, teacher_channels: Sequence[int], num_outputs: int,
                 conv_op: type = nn.Conv3d, reduction: int = 16) -> None:
        super().__init__()
        if len(teacher_channels) == 0:
            raise ValueError("CDSFLFusion needs at least one teacher")
        self.teacher_channels = [int(c) for c in teacher_channels]
        self.num_outputs = int(num_outputs)
        self.gates = nn.ModuleList(ChannelGate(c, reduction) for c in self.teacher_channels)
        self.projections = nn.ModuleList(conv_op(c, self.num_outputs, kernel_size=1)
                                         for c in self.teacher_channels)
        self.fuse = conv_op(self.num_outputs, self.num_outputs, kernel_size=1)

    def forward(self, teacher_features: Sequence[Tensor]) -> Tensor:
        if len(teacher_features) != len(self.teacher_channels):
            raise ValueError(
                f"CDSFLFusion was built for {len(self.teacher_channels)} teachers but got "
                f"{len(teacher_features)} feature tensors"
            )
        fused = None
        for feat, gate, proj in zip(teacher_features, self.gates, self.projections):
            y = proj(gate(feat))
            fused = y if fused is None else fused + y
        return self.fuse(fused)


class CDSFL(nn.Module):
    """CDSFL over several deep-supervision levels (one :class:`CDSFLFusion` each).

    Args:
        levels: deep-supervision level indices (0 = full resolution, 1 = half, ...);
            the reference uses level 1 only.
        teacher_channels_per_level: level -> feature channels of each teacher there.
        num_outputs, conv_op, reduction: as :class:`CDSFLFusion`.

    forward(features: {level: sequence of (B, C_i, *spatial_level)})
        -> {level: (B, num_outputs, *spatial_level)} for every configured level.
    """

    def __init__(self, levels: Sequence[int], teacher_channels_per_level: Mapping[int, Sequence[int]],
                 num_outputs: int, conv_op: type = nn.Conv3d, reduction: int = 16) -> None:
        super().__init__()
        self.levels = [int(lvl) for lvl in levels]
        if len(set(self.levels)) != len(self.levels):
            raise ValueError(f"duplicate levels in {self.levels}")
        missing = [lvl for lvl in self.levels if lvl not in teacher_channels_per_level]
        if missing:
            raise ValueError(f"no teacher channels given for level(s) {missing}")
        self.fusions = nn.ModuleDict({
            str(lvl): CDSFLFusion(teacher_channels_per_level[lvl], num_outputs, conv_op, reduction)
            for lvl in self.levels
        })

    def forward(self, features: Mapping[int, Sequence[Tensor]]) -> Dict[int, Tensor]:
        missing = [lvl for lvl in self.levels if lvl not in features]
        if missing:
            raise ValueError(f"CDSFL needs features for level(s) {missing}, got levels {sorted(features)}")
        return {lvl: self.fusions[str(lvl)](features[lvl]) for lvl in self.levels}


def fuse_with_detached_copy(cdsfl: nn.Module, features: Mapping[int, Sequence[Tensor]]
                            ) -> Tuple[Dict[int, Tensor], Dict[int, Tensor]]:
    """The fused logits from the teachers' features and from a detached copy of them, in one forward.

    Args:
        cdsfl: a :class:`CDSFL` (or a DDP wrapper of one).
        features: level -> one (B, C_i, *spatial) tensor per teacher.

    Returns:
        ``(fused, fused_from_detached)``: level -> (B, num_outputs, *spatial) each; equal values, but
        only ``fused`` back-propagates into the teachers.
    """
    stacked = {lvl: [torch.cat([f, f.detach()]) for f in feats] for lvl, feats in features.items()}
    out = cdsfl(stacked)
    fused, from_detached = {}, {}
    for lvl, logits in out.items():
        fused[lvl], from_detached[lvl] = logits.chunk(2)
    return fused, from_detached


def cdsfl_seg_loss(seg_loss: Callable[[Tensor, Tensor], Tensor], fused: Mapping[int, Tensor],
                   target: Sequence[Tensor], teacher_weight: float,
                   fused_from_detached: Mapping[int, Tensor] = None) -> Tensor:
    """Segmentation loss of the fused output, summed over its levels, with the teachers' share.

    Args:
        seg_loss: single-level loss, (logits (B, C, *s), target (B, C', *s)) -> 0-dim.
        fused: level -> fused logits computed from the teachers' features.
        target: deep-supervision targets, indexed by level.
        teacher_weight: the weight of this loss on the teachers' gradient (the paper's 0.08).
        fused_from_detached: the same logits from detached features (:func:`fuse_with_detached_copy`).
            Given: ``teacher_weight * seg(fused) + (1 - teacher_weight) * seg(fused_from_detached)``,
            so the head learns at weight 1 and the teachers at ``teacher_weight``. None: the paper's
            ``teacher_weight * seg(fused)`` (head and teachers alike).

    Returns:
        0-dim tensor.
    """
    loss = teacher_weight * sum(seg_loss(fused[lvl], target[lvl]) for lvl in fused)
    if fused_from_detached is not None:
        loss = loss + (1.0 - teacher_weight) * sum(seg_loss(fused_from_detached[lvl], target[lvl])
                                                   for lvl in fused_from_detached)
    return loss
