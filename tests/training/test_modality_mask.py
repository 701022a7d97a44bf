"""Random modality-availability masks of MGSD and modality dropout."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from nnunet_kd.brats import all_modality_subsets
from nnunet_kd.training.modality_mask import apply_modality_mask, sample_modality_masks


def test_masks_proper_uniform_and_per_sample():
    g = torch.Generator().manual_seed(0)
    n = 5600
    masks = sample_modality_masks(n, 4, generator=g)
    assert masks.shape == (n, 4) and masks.dtype == torch.bool
    assert masks.any(1).all() and not masks.all(1).any()
    counts = Counter(tuple(r) for r in masks.int().tolist())
    assert len(counts) == 14
    expected = n / 14
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 40  # 13 dof: p ~ 1e-4 at 35
    # per sample: a batch is not one repeated mask
    batch = sample_modality_masks(16, 4, generator=g)
    assert len({tuple(r) for r in batch.tolist()}) > 1


def test_masks_deterministic_with_seed_and_device():
    a = sample_modality_masks(32, 4, generator=torch.Generator().manual_seed(7))
    b = sample_modality_masks(32, 4, generator=torch.Generator().manual_seed(7), device="cpu")
    assert torch.equal(a, b)
    two = sample_modality_masks(100, 2)
    assert (two.sum(1) == 1).all()
    with pytest.raises(ValueError, match=r"num_modalities must be in \[2, 62\].*got 1"):
        sample_modality_masks(4, 1)


def test_all_modality_subsets():
    subsets = all_modality_subsets(4)
    assert len(subsets) == 15 and len(set(subsets)) == 15
    assert all(len(s) >= 1 for s in subsets)
    assert subsets[:4] == [(0,), (1,), (2,), (3,)] and subsets[4] == (0, 1) and subsets[-1] == (0, 1, 2, 3)
    assert [len(s) for s in subsets] == sorted(len(s) for s in subsets)
    assert subsets == all_modality_subsets(4)


@pytest.mark.parametrize("channel_indices", [[0, 1, 2, 3], [2, 0, 3, 1]])
def test_apply_modality_mask(channel_indices):
    data = torch.randn(3, 5, 4, 5, 6)  # channel 4 is not a modality: never touched
    mask = torch.tensor([[True, False, True, False], [False, False, False, True], [True, True, True, True]])
    out = apply_modality_mask(data, mask, channel_indices)
    assert out.shape == data.shape and out.data_ptr() != data.data_ptr()
    for b in range(3):
        for m, c in enumerate(channel_indices):
            if mask[b, m]:
                assert torch.equal(out[b, c], data[b, c])
            else:
                assert (out[b, c] == 0).all()
        assert torch.equal(out[b, 4], data[b, 4])
    assert not torch.equal(data, out)  # input unchanged, result new


def test_apply_modality_mask_errors_and_2d():
    data = torch.randn(2, 4, 7, 9)
    out = apply_modality_mask(data, torch.tensor([[True, False, False, False], [False, True, True, True]]), range(4))
    assert (out[0, 1:] == 0).all() and torch.equal(out[0, 0], data[0, 0]) and (out[1, 0] == 0).all()
    with pytest.raises(ValueError, match="a row with every modality missing"):
        apply_modality_mask(data, torch.tensor([[True, False, False, False], [False] * 4]), range(4))
    with pytest.raises(ValueError, match=r"modality_mask must have shape \(2, 4\), got \(2, 3\)"):
        apply_modality_mask(data, torch.ones(2, 3, dtype=torch.bool), range(4))
    with pytest.raises(ValueError, match=r"channel_indices must be distinct indices in \[0, 4\), got \[0, 0, 1, 2\]"):
        apply_modality_mask(data, torch.ones(2, 4, dtype=torch.bool), [0, 0, 1, 2])
