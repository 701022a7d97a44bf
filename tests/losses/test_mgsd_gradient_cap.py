"""MGSD's distillation schedule and gradient cap: the ramp-up, the cap's factor, and a step whose supervised
update is not scaled down by a huge auxiliary term (issue 22)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nnunet_kd.training.schedules import linear_rampup
from nnunet_kd.training.gradient_shares import GradientShareMeter, auxiliary_scale, clip_threshold, gradient_norms
from nnunet_kd.training.optimisation import backward_and_step, clip_gradients


def test_linear_rampup_known_values():
    assert [linear_rampup(e, 10) for e in (0, 1, 5, 9, 10, 11, 1000)] == [0.0, 0.1, 0.5, 0.9, 1.0, 1.0, 1.0]
    assert linear_rampup(0, 0) == 1.0 and linear_rampup(3, 0) == 1.0  # no ramp
    assert linear_rampup(1, 4) == 0.25
    with pytest.raises(ValueError, match="must be >= 0, got -1 and 10"):
        linear_rampup(-1, 10)


def test_auxiliary_scale_known_values():
    # The numbers at init: supervised 1.5, modality-level term 60. Share 0.3: the auxiliary norm may
    # be at most 0.3 / 0.7 * 1.5 = 0.642857, so c = 0.642857 / 60.
    c = auxiliary_scale(1.5, 60.0, 0.3)
    assert c == pytest.approx(0.3 / 0.7 * 1.5 / 60.0)
    assert c * 60.0 / (1.5 + c * 60.0) == pytest.approx(0.3)  # exactly at the band's edge
    assert auxiliary_scale(1.5, 0.5, 0.3) == 1.0  # within the band: untouched (never scaled up)
    assert auxiliary_scale(1.5, 0.0, 0.3) == 1.0
    assert auxiliary_scale(0.0, 2.0, 0.3) == 0.0
    assert clip_threshold(12.0, 0.3) == pytest.approx(12.0 / 0.7)
    assert clip_threshold(12.0, 0.0) == 12.0
    with pytest.raises(ValueError, match=r"max_share must be in \[0, 1\), got 1.0"):
        auxiliary_scale(1.0, 1.0, 1.0)


def test_meter_add_matches_update():
    meter = GradientShareMeter(["supervised", "image"])
    meter.add({"supervised": 3.0, "image": 1.0})
    meter.add({"supervised": 1.0})
    summary = meter.summary()
    assert summary["norm"] == {"supervised": 2.0, "image": 0.5} and summary["share"]["image"] == pytest.approx(0.2)
    with pytest.raises(KeyError, match="unknown loss terms \\['feature'\\]"):
        meter.add({"feature": 1.0})


def test_clip_gradients_returns_the_norm_before_clipping():
    p = nn.Parameter(torch.zeros(2))
    assert clip_gradients([p]) is None  # no gradient yet
    p.grad = torch.tensor([30.0, 40.0])
    norm = clip_gradients([p], 12.0)
    assert float(norm) == pytest.approx(50.0)
    assert torch.allclose(p.grad, torch.tensor([30.0, 40.0]) * 12.0 / 50.0, rtol=1e-5)


def _step(supervised_scale: float, aux_weight: float, capped: bool):
    """One SGD step (lr 1, no momentum) of a small network on supervised_scale * supervised + aux_weight * aux,
    as MGSD takes it: with ``capped``, the auxiliary term is scaled by the cap's factor and the network clipped
    at 12 / 0.7; otherwise at nnU-Net's 12. Returns (applied clip factor, update, supervised gradient)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    out = net(x)
    terms = {"supervised": supervised_scale * nn.functional.mse_loss(out, y),
             "aux": aux_weight * out.pow(2).mean()}  # an auxiliary term pulling elsewhere
    params = list(net.parameters())
    supervised_grad = torch.cat([g.flatten() for g in torch.autograd.grad(terms["supervised"], params,
                                                                          retain_graph=True)])
    max_norm, scale = 12.0, 1.0
    if capped:
        norms = gradient_norms(terms, params)
        scale = auxiliary_scale(norms["supervised"], norms["aux"], 0.3)
        max_norm = clip_threshold(12.0, 0.3)
    before = torch.cat([p.detach().flatten().clone() for p in params])
    optimizer = torch.optim.SGD(params, lr=1.0)
    optimizer.zero_grad()
    norm, = backward_and_step(terms["supervised"] + scale * terms["aux"], [optimizer], [net], max_norms=[max_norm])
    update = torch.cat([p.detach().flatten() for p in params]) - before
    return min(1.0, max_norm / float(norm)), update, supervised_grad, scale


@pytest.mark.parametrize("supervised_scale", [1.0, 40.0])  # supervised norm below and above 12
def test_huge_auxiliary_term_does_not_scale_the_supervised_update_down(supervised_scale):
    off, update_off, g_sup, _ = _step(supervised_scale, 0.0, capped=False)  # distillation off: nnU-Net's step
    on, update_on, _, scale = _step(supervised_scale, 1e4, capped=True)
    sup_norm = float(g_sup.norm())
    assert off == pytest.approx(min(1.0, 12.0 / sup_norm), rel=1e-5)
    assert (sup_norm < 12) == (supervised_scale == 1.0)
    # the supervised part of the update (clip factor x supervised gradient) is at least nnU-Net's
    assert on >= off - 1e-6
    if sup_norm < 12:
        assert on == 1.0 and torch.allclose(update_off, -g_sup, atol=1e-6)
    assert 0 < scale < 1e-2  # the cap acted: 1e4 x the auxiliary term is brought into the band
    # without the cap the huge term takes the clipping and the supervised step shrinks by orders of magnitude
    uncapped, _, _, _ = _step(supervised_scale, 1e4, capped=False)
    assert uncapped < 0.05 * off
