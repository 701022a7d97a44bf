"""Gradient shares at the outputs: known values, no gradient leaks into the outputs, averaging; the epoch's
clipping statistics."""
import pytest
import torch

from nnunet_kd.training.gradient_shares import ClipStatistics, GradientShareMeter, gradient_norms


def test_norms_have_known_values_and_leave_graphs_usable():
    logits = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    out = logits * 1.0
    # d(sum x^2)/dx = 2x; d(3 * mean x)/dx = 3/4 everywhere
    terms = {"sq": out.pow(2).sum(), "mean": 3 * out.mean(), "const": torch.tensor(1.0)}
    norms = gradient_norms(terms, [out])
    assert norms["sq"] == pytest.approx(2 * logits.detach().norm().item())
    assert norms["mean"] == pytest.approx((4 * 0.75 ** 2) ** 0.5)
    assert norms["const"] == 0.0
    assert logits.grad is None  # measuring does not accumulate gradients
    (terms["sq"] + terms["mean"]).backward()  # graphs were retained
    assert torch.allclose(logits.grad, 2 * logits.detach() + 0.75)


def test_norm_over_several_outputs_combines_them():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(4, requires_grad=True)
    norms = gradient_norms({"t": 2 * a.sum() + b.sum()}, [a, b])
    assert norms["t"] == pytest.approx((3 * 4 + 4 * 1) ** 0.5)


def test_meter_averages_steps_and_shares_sum_to_one():
    meter = GradientShareMeter(["sup", "kd"])
    for scale in (1.0, 3.0):
        x = torch.ones(4, requires_grad=True)
        meter.update({"sup": scale * x.sum(), "kd": x.sum()}, [x])  # norms 2*scale and 2
    summary = meter.summary()
    assert summary["norm"]["sup"] == pytest.approx(4.0)
    assert summary["norm"]["kd"] == pytest.approx(2.0)
    assert summary["share"]["sup"] == pytest.approx(2 / 3)
    assert sum(summary["share"].values()) == pytest.approx(1.0)
    meter.reset()
    assert meter.summary()["share"] == {"sup": 0.0, "kd": 0.0}
    with pytest.raises(KeyError, match="unknown loss terms"):
        meter.update({"other": x.sum()}, [x])


def test_scale_avoids_half_precision_underflow_and_is_divided_out():
    x = torch.ones(4, dtype=torch.float16, requires_grad=True)  # half-precision activations, as under AMP
    tiny = (1e-8 * x.float()).sum()  # float32 loss; d/dx = 1e-8 is below float16's smallest subnormal (6e-8)
    assert gradient_norms({"t": tiny}, [x])["t"] == 0.0
    assert gradient_norms({"t": tiny}, [x], scale=2.0 ** 16)["t"] == pytest.approx(2e-8, rel=1e-2)


def test_clip_statistics_of_an_epoch():
    stats = ClipStatistics()
    stats.add(torch.tensor(6.0), 12.0, 1.0)  # ratio 0.5
    stats.add(torch.tensor(18.0), 12.0, 0.5)  # ratio 1.5: clipped
    stats.add(torch.tensor(float("inf")), 12.0, 0.25)  # a step the grad scaler skips: no ratio
    stats.add(None, 12.0, 1.0)  # no gradient at all
    summary = stats.summary(steps=4, max_norm=17.0)
    assert summary == pytest.approx({"max_norm": 17.0, "ratio_mean": 1.0, "ratio_max": 1.5, "clipped_fraction": 0.5,
                                     "distillation_scale_mean": 2.75 / 4, "distillation_scale_min": 0.25})
    stats.reset()
    assert stats.summary(steps=0, max_norm=12.0) == {"max_norm": 12.0, "ratio_mean": 0.0, "ratio_max": 0.0,
                                                     "clipped_fraction": 0.0, "distillation_scale_mean": 0.0,
                                                     "distillation_scale_min": 1.0}
