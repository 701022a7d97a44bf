"""Tests of the MGSD building blocks (CPU, small tensors)."""
from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
from torch import nn

from nnunet_kd.losses.mgsd import (
    MultiViewConsistencyLoss,
    MutualAwareAttention,
    StyleDiscriminator,
    all_modality_subsets,
    apply_modality_mask,
    discriminator_loss,
    ema_update,
    generator_adversarial_loss,
    sample_modality_masks,
)


# ---------------------------------------------------------------- modality masks

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
    with pytest.raises(ValueError):
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
    with pytest.raises(ValueError):
        apply_modality_mask(data, torch.tensor([[True, False, False, False], [False] * 4]), range(4))
    with pytest.raises(ValueError):
        apply_modality_mask(data, torch.ones(2, 3, dtype=torch.bool), range(4))
    with pytest.raises(ValueError):
        apply_modality_mask(data, torch.ones(2, 4, dtype=torch.bool), [0, 0, 1, 2])


# ---------------------------------------------------------------- EMA

def _small_model() -> nn.Module:
    return nn.Sequential(nn.Conv3d(2, 3, 3), nn.BatchNorm3d(3), nn.Conv3d(3, 1, 1))


def test_ema_update_formula_two_steps():
    torch.manual_seed(0)
    model, ema = _small_model(), _small_model()
    e0 = {k: v.clone() for k, v in ema.state_dict().items()}
    mom = 0.9
    p1 = {k: v.clone() for k, v in model.named_parameters()}
    ema_update(ema, model, mom)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model(torch.randn(2, 2, 5, 5, 5))  # changes BN running stats (buffers)
    p2 = {k: v.clone() for k, v in model.named_parameters()}
    ema_update(ema, model, mom)
    for k, v in ema.named_parameters():
        step1 = mom * e0[k] + (1 - mom) * p1[k]
        expected = mom * step1 + (1 - mom) * p2[k]
        assert torch.allclose(v, expected, rtol=0, atol=1e-7), k
        assert not v.requires_grad or v.grad is None
    for k, v in ema.named_buffers():  # buffers copied, including the integer num_batches_tracked
        assert torch.equal(v, model.state_dict()[k]), k


def test_ema_momentum_edges_and_wrapped():
    torch.manual_seed(1)
    model, ema = _small_model(), _small_model()
    keep = copy.deepcopy(ema.state_dict())
    ema_update(ema, model, 1.0)
    for k, v in ema.named_parameters():
        assert torch.equal(v, keep[k])
    ema_update(ema, model, 0.0)
    for k, v in ema.named_parameters():
        assert torch.equal(v, dict(model.named_parameters())[k])
    # wrapped training network (DataParallel exposes .module like DDP)
    ema2 = _small_model()
    ema_update(ema2, nn.DataParallel(model), 0.0)
    assert all(torch.equal(a, b) for a, b in zip(ema2.parameters(), model.parameters()))
    # floating buffers can be averaged too
    ema3 = _small_model()
    with torch.no_grad():
        model[1].running_mean.fill_(2.0)
    ema_update(ema3, model, 0.5, ema_buffers=True)
    assert torch.allclose(ema3[1].running_mean, torch.full((3,), 1.0))
    with pytest.raises(ValueError):
        ema_update(ema, model, 1.5)
    with pytest.raises(ValueError):
        ema_update(nn.Linear(2, 2), model, 0.5)


# ---------------------------------------------------------------- multi-view consistency

@pytest.mark.parametrize("shapes", [[(2, 8, 5, 7, 9), (2, 4, 3, 11, 6)],
                                    [(2, 8, 5, 7, 9), (2, 4, 3, 11, 6), (2, 6, 1, 2, 3), (2, 3, 9, 9, 9)],
                                    [(2, 8, 13, 7), (2, 4, 6, 5)]])
def test_multiview_zero_positive_gradients(shapes):
    torch.manual_seed(0)
    loss_fn = MultiViewConsistencyLoss([s[1] for s in shapes])
    assert list(loss_fn.parameters()) == []  # no learnable head
    full = [torch.randn(*s, requires_grad=True) for s in shapes]
    same = loss_fn(full, [f.detach().clone() for f in full])
    assert same.ndim == 0 and same.item() == pytest.approx(0.0, abs=1e-10)
    masked = [(f.detach() + 0.5 * torch.randn_like(f)).requires_grad_(True) for f in full]
    loss = loss_fn(full, masked)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(f.grad is None for f in full)  # teacher side detached
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in masked)


def test_multiview_errors_and_autocast():
    loss_fn = MultiViewConsistencyLoss([4, 2])
    a, b = torch.randn(1, 4, 3, 5, 7), torch.randn(1, 2, 5, 3, 3)
    with pytest.raises(ValueError):
        loss_fn([a], [a])
    with pytest.raises(ValueError):
        loss_fn([a, b], [a, b[:, :, :4]])
    with pytest.raises(ValueError):
        loss_fn([b, a], [b, a])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn([a, b], [a + 1, b - 1])
    assert torch.isfinite(loss) and loss.dtype == torch.float32 and loss > 0


# ---------------------------------------------------------------- mutual-aware attention

def _attention_inputs(mask: torch.Tensor, spatial=(9, 11, 7), bottleneck=(3, 2, 5), cb=16):
    b, m = mask.shape
    full_input = torch.randn(b, m, *spatial)
    masked_input = apply_modality_mask(full_input, mask, range(m))
    full_bn = torch.randn(b, cb, *bottleneck)
    masked_bn = (full_bn + torch.randn_like(full_bn)).requires_grad_(True)
    return full_bn, masked_bn, full_input, masked_input


@pytest.mark.parametrize("mask", [
    [[True, False, False, False]],
    [[False, True, False, True], [True, True, False, False]],
    [[True, True, True, False], [False, False, True, False], [True, False, True, True]],
    [[True, True, True, True], [True, True, True, True]],
    [[True, True, True, True], [False, False, False, True]],
])
def test_mutual_attention_any_subset(mask):
    torch.manual_seed(0)
    mask = torch.tensor(mask)
    module = MutualAwareAttention(16, embed_dim=32, num_heads=4, token_grid=2)
    full_bn, masked_bn, full_in, masked_in = _attention_inputs(mask)
    full_bn.requires_grad_(True)
    loss = module(full_bn, masked_bn, full_in, masked_in, mask)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert masked_bn.grad is not None and masked_bn.grad.abs().sum() > 0
    assert full_bn.grad is None  # the full pass is the teacher


def test_mutual_attention_weighting():
    """Per-sample weights: 0.6 present / 0.4 missing, renormalised to the present term when none is missing."""
    torch.manual_seed(0)
    module = MutualAwareAttention(16, embed_dim=32, num_heads=4, token_grid=2)
    mask = torch.tensor([[True, False, True, False], [True, True, True, True]])
    full_bn, masked_bn, full_in, masked_in = _attention_inputs(mask)
    loss = module(full_bn, masked_bn, full_in, masked_in, mask)
    per = [module(full_bn[i:i + 1], masked_bn[i:i + 1], full_in[i:i + 1], masked_in[i:i + 1], mask[i:i + 1])
           for i in range(2)]
    assert torch.allclose(loss, (per[0] + per[1]) / 2, atol=1e-5)


def test_mutual_attention_2d_autocast_and_errors():
    torch.manual_seed(0)
    mask = torch.tensor([[False, False, True, False], [True, False, True, True]])
    module = MutualAwareAttention(8, embed_dim=16, num_heads=2, token_grid=3, conv_dim=2)
    full_in = torch.randn(2, 4, 13, 10)
    masked_in = apply_modality_mask(full_in, mask, [0, 1, 2, 3])
    fb, mb = torch.randn(2, 8, 3, 2), torch.randn(2, 8, 3, 2, requires_grad=True)
    assert torch.isfinite(module(fb, mb, full_in, masked_in, mask))
    module3 = MutualAwareAttention(16, embed_dim=32, num_heads=4, token_grid=2)
    full_bn, masked_bn, f3, m3 = _attention_inputs(mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module3(full_bn, masked_bn, f3, m3, mask)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(masked_bn.grad).all()
    with pytest.raises(ValueError):
        module(fb, mb, full_in, masked_in, mask.int())
    with pytest.raises(ValueError):
        module(fb, mb[:, :4], full_in, masked_in, mask)
    with pytest.raises(ValueError):
        module(fb, mb, full_in[:, :3], masked_in[:, :3], mask)


# ---------------------------------------------------------------- discriminator

@pytest.mark.parametrize("shape,conv_dim", [((3, 3, 9, 7, 5), 3), ((3, 4, 11, 6), 2)])
def test_discriminator_shapes_and_losses(shape, conv_dim):
    torch.manual_seed(0)
    disc = StyleDiscriminator(shape[1], base_channels=8, num_layers=2, conv_dim=conv_dim)
    full, masked = torch.rand(*shape), torch.rand(*shape) * 0.2
    d_full, d_masked = disc(full), disc(masked)
    assert d_full.shape == (shape[0],) and d_masked.shape == (shape[0],)
    d0 = discriminator_loss(d_full, d_masked)
    g0 = generator_adversarial_loss(d_masked)
    assert torch.isfinite(d0) and torch.isfinite(g0)
    assert d0.item() == pytest.approx(math.log(2), abs=0.2)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        discriminator_loss(disc(full), disc(masked)).backward()
        opt.step()
    with torch.no_grad():
        assert discriminator_loss(disc(full), disc(masked)) < d0
        assert generator_adversarial_loss(disc(masked)) > g0  # a better D makes the generator's task harder
