"""Feature-level distillation of MGSD: multi-view (axis-profile) consistency of the masked pass's decoder
features with the full pass's (the normalisation is the reference code's ``mutiaxis_norm``,
github.com/henryccl/MMBTS; the comparison departs from it, see :class:`MultiViewConsistencyLoss`)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["axis_profiles", "mix_normalise", "normalised_profiles", "MultiViewConsistencyLoss"]


def axis_profiles(x: torch.Tensor) -> list[torch.Tensor]:
    """Average-pool features to one 1-D profile per spatial axis.

    Args:
        x: (B, C, *spatial) with n >= 1 spatial axes.

    Returns:
        n float32 tensors, the i-th of shape (B, C, spatial[i]): the mean over all other spatial axes (for
        3-D (D, H, W): axial (B, C, D), coronal (B, C, H), sagittal (B, C, W)).
    """
    n = x.ndim - 2
    if n < 1:
        raise ValueError(f"expected (B, C, *spatial), got shape {tuple(x.shape)}")
    out = []
    for axis in range(n):
        other = tuple(2 + a for a in range(n) if a != axis)
        out.append(x.mean(dim=other, dtype=torch.float32) if other else x.float())
    return out


def mix_normalise(x: torch.Tensor, gamma: float = 0.7, eps: float = 1e-6) -> torch.Tensor:
    """The reference's multi-view normalisation (``mutiaxis_norm``, GRN-style), per sample.

    g = L2 norm of x over the L positions, per channel, (B, C, 1); n = g / (mean of g over the C channels
    + eps), (B, C, 1); out = gamma * x * n + (1 - gamma) * x. Channels with a larger profile norm than
    average are amplified, weaker ones damped.

    Args:
        x: (B, C, L), L positions (the concatenated axis profiles) of C channels.
        gamma: weight of the normalised profile against the raw one.
        eps: added to the mean norm.

    Returns:
        (B, C, L) tensor.
    """
    if x.ndim != 3:
        raise ValueError(f"expected (B, C, L), got shape {tuple(x.shape)}")
    g = torch.linalg.vector_norm(x, ord=2, dim=2, keepdim=True)
    n = g / (g.mean(dim=1, keepdim=True) + eps)
    return gamma * (x * n) + (1.0 - gamma) * x


def normalised_profiles(x: torch.Tensor, gamma: float = 0.7, eps: float = 1e-6) -> list[torch.Tensor]:
    """Axis profiles of x, normalised together as the reference does.

    The n profiles (see :func:`axis_profiles`) are concatenated along positions to (B, C, sum(spatial)),
    normalised by :func:`mix_normalise` (so g is one norm per channel over all axes' positions) and split back.

    Args:
        x: (B, C, *spatial) features.
        gamma, eps: as :func:`mix_normalise`.

    Returns:
        n float32 tensors (B, C, spatial[i]).
    """
    profiles = axis_profiles(x)
    joint = mix_normalise(torch.cat(profiles, dim=2), gamma, eps)
    return list(joint.split([p.shape[2] for p in profiles], dim=2))


class MultiViewConsistencyLoss(nn.Module):
    """Multi-view consistency: masked-pass features are pulled towards full-pass features.

    For each stage s, features (B, C_s, *spatial_s) of both passes are turned into axis profiles
    normalised together (see :func:`normalised_profiles`: the reference's normalisation over the
    concatenated profiles), P_full and P_masked, each (B, C_s, sum(spatial_s)). The profiles are compared
    directly, as a relative squared error per sample:

        loss_s = mean over b of  sum((P_masked[b] - P_full[b])^2) / (sum(P_full[b]^2) + eps)

    and the total is the sum over stages (as in the reference). The full pass is the teacher: its profiles are detached.

    No learnable projection (the reference projects both sides with a trained 1-D conv): a head trained
    through the masked side towards a target made by the same head sets the term's size itself (it fell to
    a few % or grew many-fold with the network frozen). Here the term is a fixed function of the features,
    and dividing by the teacher's energy makes it independent of their overall scale, so the network cannot
    lower it by shrinking its features either. Works for any number of spatial axes (2-D and 3-D), any sizes
    and under autocast (profiles, normalisation and error in float32). No parameters.
    """

    def __init__(self, channels_per_stage: Sequence[int], gamma: float = 0.7, eps: float = 1e-6) -> None:
        super().__init__()
        if len(channels_per_stage) == 0:
            raise ValueError("channels_per_stage must not be empty")
        self.channels_per_stage = [int(c) for c in channels_per_stage]
        self.gamma = float(gamma)
        self.eps = float(eps)

    def profiles(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_s, *spatial) -> normalised axis profiles concatenated along positions, (B, C_s, sum(spatial))."""
        return torch.cat(normalised_profiles(x, self.gamma, self.eps), dim=2)

    def forward(self, full_features: Sequence[torch.Tensor], masked_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Args: full_features, masked_features: one (B, C_s, *spatial_s) tensor per stage (the full pass is
        detached here). Returns: 0-dim float32 tensor, the sum over stages."""
        n = len(self.channels_per_stage)
        if len(full_features) != n or len(masked_features) != n:
            raise ValueError(f"expected {n} stages, got {len(full_features)} full and {len(masked_features)} masked")
        total = None
        for s, (f, m) in enumerate(zip(full_features, masked_features)):
            if f.shape != m.shape:
                raise ValueError(f"stage {s}: full {tuple(f.shape)} vs masked {tuple(m.shape)}")
            if f.ndim < 3 or f.shape[1] != self.channels_per_stage[s]:
                raise ValueError(f"stage {s}: expected (B, {self.channels_per_stage[s]}, *spatial), got {tuple(f.shape)}")
            target = self.profiles(f.detach())
            error = (self.profiles(m) - target).pow(2).flatten(1).sum(1)  # (B,)
            loss = (error / (target.pow(2).flatten(1).sum(1) + self.eps)).mean()
            total = loss if total is None else total + loss
        return total
