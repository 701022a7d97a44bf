"""The reference's multi-view normalisation, with values worked out by hand."""
from __future__ import annotations

import pytest
import torch

from nnunet_kd.losses import MultiViewConsistencyLoss, axis_profiles, mix_normalise, normalised_profiles


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


def test_loss_compares_the_joint_normalised_profiles():
    """The term is the relative squared error of the jointly normalised profiles, per sample, summed over
    stages: a fixed function of the features (no parameters)."""
    torch.manual_seed(0)
    loss_fn = MultiViewConsistencyLoss([3, 2])
    full = [torch.randn(2, 3, 5, 6, 7), torch.randn(2, 2, 3, 4, 5)]
    masked = [f + torch.randn_like(f) for f in full]
    expected = 0.0
    for f, m in zip(full, masked):
        pf, pm = torch.cat(normalised_profiles(f, 0.7), 2), torch.cat(normalised_profiles(m, 0.7), 2)
        assert pf.shape == (2, f.shape[1], sum(f.shape[2:]))
        expected += torch.stack([((pm[b] - pf[b]) ** 2).sum() / ((pf[b] ** 2).sum() + 1e-6) for b in range(2)]).mean()
    assert torch.allclose(loss_fn(full, masked), expected, rtol=1e-5)
    assert list(loss_fn.parameters()) == []


def test_loss_known_value():
    # 1-D features (B=1, C=2, L=2): the profile is the feature itself. Full: channel norms 5 and 15
    # (n = [0.5, 1.5]) -> [[1.95, 2.6], [12.15, 16.2]] (see test_mix_normalise_known_values). Masked: the same
    # with channel 1 zeroed: norms 5 and 0, n = [2, 0] -> [[3 * 1.7, 4 * 1.7], [0, 0]] = [[5.1, 6.8], [0, 0]].
    full = torch.tensor([[[3.0, 4.0], [9.0, 12.0]]])
    masked = torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])
    error = (5.1 - 1.95) ** 2 + (6.8 - 2.6) ** 2 + 12.15 ** 2 + 16.2 ** 2
    energy = 1.95 ** 2 + 2.6 ** 2 + 12.15 ** 2 + 16.2 ** 2
    assert MultiViewConsistencyLoss([2])([full], [masked]).item() == pytest.approx(error / energy, rel=1e-5)


def test_heads_cannot_set_the_size_and_scale_does_not_change_it():
    """The issue's heads-only setting (network frozen, heads trained) has nothing to train here: the term is
    the same before and after any number of optimiser steps, and scaling both passes' features by one factor
    (what a network could do to shrink an MSE) leaves it unchanged."""
    torch.manual_seed(0)
    loss_fn = MultiViewConsistencyLoss([4])
    full = torch.randn(3, 4, 6, 5, 4).relu()
    masked = (full + 0.3 * torch.randn_like(full)).relu()
    value = loss_fn([full], [masked]).item()
    for factor in (0.1, 0.5, 7.0):  # eps (1e-6) matters only for features near 0
        assert loss_fn([factor * full], [factor * masked]).item() == pytest.approx(value, rel=1e-4)
    with pytest.raises(ValueError, match="empty parameter list"):  # an optimiser over its parameters cannot be built
        torch.optim.AdamW(loss_fn.parameters(), lr=1e-3)
    assert loss_fn([full], [masked]).item() == value
