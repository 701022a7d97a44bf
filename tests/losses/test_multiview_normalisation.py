"""The reference's multi-view normalisation, with values worked out by hand."""
from __future__ import annotations

import pytest
import torch

from nnunet_kd.losses.multiview import MultiViewConsistencyLoss, axis_profiles, mix_normalise, normalised_profiles


def test_mix_normalise_known_values():
    # channel 0: [3, 4] has norm 5; channel 1: [9, 12] has norm 15; mean norm 10, so n = [0.5, 1.5]
    # and out = x * (0.7 * n + 0.3) = x * [0.65, 1.35]. Sample 2 is sample 1 doubled: n is scale-free.
    x = torch.tensor([[[3.0, 4.0], [9.0, 12.0]], [[6.0, 8.0], [18.0, 24.0]]])
    expected = torch.tensor([[[1.95, 2.6], [12.15, 16.2]], [[3.9, 5.2], [24.3, 32.4]]])
    assert torch.allclose(mix_normalise(x, 0.7), expected, rtol=1e-6, atol=0)
    assert torch.allclose(mix_normalise(x, 0.0), x)  # gamma 0 keeps the features
    with pytest.raises(ValueError, match=r"\(B, C, L\)"):
        mix_normalise(torch.ones(2, 3))


def test_profiles_are_normalised_together_over_all_axes():
    # 2-D features (1, 2, 2, 2). Axis profiles: rows (mean over W) then columns (mean over H).
    # channel 0 = ones: profiles [1, 1 | 1, 1], norm 2.  channel 1 = [[-5, -5], [3, 3]]: rows [-5, 3],
    # columns [-1, -1], concatenated norm sqrt(25 + 9 + 1 + 1) = 6. Mean norm 4: n = [0.5, 1.5].
    x = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[-5.0, -5.0], [3.0, 3.0]]]])
    rows, columns = normalised_profiles(x, 0.7)
    assert torch.allclose(rows, torch.tensor([[[0.65, 0.65], [-6.75, 4.05]]]), rtol=1e-6)
    assert torch.allclose(columns, torch.tensor([[[0.65, 0.65], [-1.35, -1.35]]]), rtol=1e-6)
    # normalising each axis on its own would give other values (column norms sqrt(2) and sqrt(2): n = 1)
    assert not torch.allclose(columns, mix_normalise(axis_profiles(x)[1], 0.7))


def test_loss_uses_the_joint_normalisation():
    torch.manual_seed(0)
    loss_fn = MultiViewConsistencyLoss([3], projection_dim=4)
    x = torch.randn(2, 3, 5, 6, 7)
    projected = loss_fn._project(0, x)
    expected = torch.cat([loss_fn.projections[0](p) for p in normalised_profiles(x, 0.7)], dim=2)
    assert projected.shape == (2, 4, 5 + 6 + 7)
    assert torch.allclose(projected, expected)
