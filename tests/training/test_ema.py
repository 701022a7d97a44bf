"""EMA of a network's weights (MGSD's teacher): the update formula, its edge cases, and the mean-teacher warm-up
of the momentum."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nnunet_kd.training.ema import ema_update, warmed_up_momentum


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
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 1.5"):
        ema_update(ema, model, 1.5)
    with pytest.raises(ValueError, match="different parameter/buffer names"):
        ema_update(nn.Linear(2, 2), model, 0.5)


def test_schedule_values():
    assert [warmed_up_momentum(s, 0.99) for s in (0, 1, 3, 9)] == pytest.approx([0.0, 0.5, 0.75, 0.9])
    assert warmed_up_momentum(98, 0.99) == pytest.approx(1 - 1 / 99)
    assert warmed_up_momentum(99, 0.99) == pytest.approx(0.99)  # 1 - 1/100 reaches the configured value
    assert warmed_up_momentum(10_000, 0.99) == 0.99
    assert warmed_up_momentum(5, 0.0) == 0.0
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        warmed_up_momentum(-1, 0.99)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 1.5"):
        warmed_up_momentum(0, 1.5)


def test_first_update_copies_and_later_ones_average():
    torch.manual_seed(0)
    online, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    ema_update(ema, online, warmed_up_momentum(0, 0.99))
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), online.parameters()))
    first = [p.detach().clone() for p in online.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    ema_update(ema, online, warmed_up_momentum(1, 0.99))  # the mean of the two networks
    for e, a, b in zip(ema.parameters(), first, online.parameters()):
        assert torch.allclose(e, (a + b) / 2)
