"""Tests of the MGSD losses (CPU, small tensors): multi-view consistency, mutual-aware attention, adversarial."""
from __future__ import annotations

import math

import pytest
import torch

from nnunet_kd.losses import (MultiViewConsistencyLoss, MutualAwareAttention, StyleDiscriminator, discriminator_loss,
                              generator_adversarial_loss)
from nnunet_kd.training.modality_mask import apply_modality_mask


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
    with pytest.raises(ValueError, match="expected 2 stages, got 1 full and 1 masked"):
        loss_fn([a], [a])
    with pytest.raises(ValueError, match=r"stage 1: full \(1, 2, 5, 3, 3\) vs masked \(1, 2, 4, 3, 3\)"):
        loss_fn([a, b], [a, b[:, :, :4]])
    with pytest.raises(ValueError, match=r"stage 0: expected \(B, 4, \*spatial\)"):
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
    with pytest.raises(ValueError, match="modality_mask must be a bool tensor"):
        module(fb, mb, full_in, masked_in, mask.int())
    with pytest.raises(ValueError, match="bottlenecks must both be"):
        module(fb, mb[:, :4], full_in, masked_in, mask)
    with pytest.raises(ValueError, match="inputs must both be"):
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
