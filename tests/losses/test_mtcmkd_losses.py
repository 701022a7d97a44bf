"""Tests of the MTCM-KD building blocks: response KD, performance weights, CDSFL."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from nnunet_kd.losses import CDSFL, CDSFLFusion, ChannelGate, ResponseKD, response_kd_loss
from nnunet_kd.training.performance import PerformanceTracker, performance_weights, whole_tumour_stats

SHAPES = [(2, 3, 5, 6), (2, 3, 4, 5, 6)]  # 2-D and 3-D


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------- KD
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("use_regions", [True, False])
def test_kd_zero_for_identical_and_positive_otherwise(shape, use_regions):
    torch.manual_seed(0)
    t = torch.randn(shape) * 3
    assert response_kd_loss(t.clone(), t, 4.0, use_regions).abs().item() < 1e-6
    s = torch.randn(shape) * 3
    loss = response_kd_loss(s, t, 4.0, use_regions)
    assert loss.ndim == 0 and loss.dtype == torch.float32
    assert loss.item() > 0


@pytest.mark.parametrize("use_regions", [True, False])
def test_kd_gradient_only_into_student(use_regions):
    torch.manual_seed(1)
    s = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    ResponseKD(2.0, 2, "mean", use_regions)(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("use_regions", [True, False])
def test_kd_temperature_power(use_regions):
    torch.manual_seed(2)
    s, t = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    T = 5.0
    l1 = response_kd_loss(s, t, T, use_regions, temperature_power=1)
    l2 = response_kd_loss(s, t, T, use_regions, temperature_power=2)
    assert torch.allclose(l2 / l1, torch.tensor(T), rtol=1e-5)


def test_kd_known_value_binary():
    # one voxel, two regions; T = 2, power 1 -> KL(t/2 || s/2) * 2, summed over regions
    t = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1, 1)
    s = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1, 1)
    T = 2.0
    expected = 0.0
    for tv, sv in [(2.0, 0.0), (-1.0, 1.0)]:
        p, q = _sigmoid(tv / T), _sigmoid(sv / T)
        expected += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    expected *= T
    got = response_kd_loss(s, t, T, use_regions=True)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kd_known_value_softmax():
    t = torch.tensor([2.0, 0.0, -1.0]).view(1, 3, 1, 1)
    s = torch.tensor([0.0, 1.0, 0.5]).view(1, 3, 1, 1)
    T = 2.0

    def softmax(v):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]

    p, q = softmax([2.0, 0.0, -1.0]), softmax([0.0, 1.0, 0.5])
    expected = T * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    got = response_kd_loss(s, t, T, use_regions=False)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kd_averages_over_voxels_and_batch():
    # replicating one voxel over batch and space must not change the value
    t1 = torch.randn(1, 3, 1, 1, 1)
    s1 = torch.randn(1, 3, 1, 1, 1)
    for use_regions in (True, False):
        one = response_kd_loss(s1, t1, 3.0, use_regions)
        many = response_kd_loss(s1.expand(2, 3, 4, 5, 6), t1.expand(2, 3, 4, 5, 6), 3.0, use_regions)
        assert torch.allclose(one, many, rtol=1e-5)


@pytest.mark.parametrize("use_regions", [True, False])
def test_kd_autocast_bf16(use_regions):
    torch.manual_seed(3)
    s = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s_bf, t_bf = s.to(torch.bfloat16), t.to(torch.bfloat16)  # as a network under autocast would give
        loss = response_kd_loss(s_bf, t_bf, 20.0, use_regions)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_kd_saturated_logits_finite():
    s = torch.full((1, 3, 2, 2), -1e4)
    t = torch.full((1, 3, 2, 2), 1e4)
    for use_regions in (True, False):
        assert torch.isfinite(response_kd_loss(s, t, 1.0, use_regions))


def test_kd_shape_mismatch_raises():
    with pytest.raises(ValueError, match="student and teacher logits must have the same shape"):
        response_kd_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, 2), 1.0, True)


# ---------------------------------------------------------------- performance weights
def test_performance_weights_basic():
    w = performance_weights([0.9, 0.6, 0.3], 0.15)
    assert w.sum().item() == pytest.approx(0.15)
    assert w[0] > w[1] > w[2]
    assert w[0].item() == pytest.approx(0.15 * 0.9 / 1.8)


def test_performance_weights_degenerate():
    assert torch.allclose(performance_weights([0.0, 0.0, 0.0], 0.3), torch.full((3,), 0.1, dtype=torch.float64))
    assert torch.allclose(performance_weights(torch.tensor([float("nan")] * 3), 0.3),
                          torch.full((3,), 0.1, dtype=torch.float64))
    w = performance_weights([float("nan"), 0.5, 0.5], 1.0)
    assert torch.allclose(w, torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64))


def test_whole_tumour_stats_regions_and_labels():
    # 1 x 4 voxels. Regions (WT, TC): WT pred = logits > 0
    logits = torch.tensor([[[3.0, -2.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]]]).view(1, 2, 2, 2)
    target = torch.tensor([[[1, 1, 0, 0], [0, 0, 0, 0]]]).view(1, 2, 2, 2)
    st = whole_tumour_stats(logits, target, use_regions=True)
    assert st.dtype == torch.float64 and not st.requires_grad
    assert st.tolist() == [1.0, 1.0, 1.0]  # tp, fp, fn
    # labels: argmax over 3 classes; pred classes [0, 2, 1, 0], ref [0, 1, 0, 2]
    lg = torch.zeros(1, 3, 4)
    for i, c in enumerate([0, 2, 1, 0]):
        lg[0, c, i] = 5.0
    tgt = torch.tensor([0, 1, 0, 2]).view(1, 1, 4)
    assert whole_tumour_stats(lg, tgt, use_regions=False).tolist() == [1.0, 1.0, 1.0]


def test_tracker_accumulates_and_dice():
    tr = PerformanceTracker(3)
    tr.update(0, torch.tensor([4.0, 1.0, 1.0], dtype=torch.float64))
    tr.update(0, [2.0, 0.0, 2.0])
    tr.update(1, [1.0, 3.0, 3.0])
    # teacher 2: no tumour, nothing predicted -> dice 1
    d = tr.dice()
    assert d[0].item() == pytest.approx(2 * 6 / (2 * 6 + 1 + 3))
    assert d[1].item() == pytest.approx(2 / (2 + 6))
    assert d[2].item() == 1.0
    w = tr.compute_weights(0.15)
    assert w.sum().item() == pytest.approx(0.15)
    assert torch.allclose(w, performance_weights(d, 0.15))
    tr.reset()
    assert tr.stats.abs().sum() == 0


def test_tracker_with_real_stats():
    # end to end with whole_tumour_stats on tiny tensors
    target = torch.tensor([1, 1, 0, 0], dtype=torch.float32).view(1, 1, 4)
    good = torch.tensor([5.0, 5.0, -5.0, -5.0]).view(1, 1, 4)
    bad = torch.tensor([5.0, -5.0, 5.0, 5.0]).view(1, 1, 4)
    tr = PerformanceTracker(2)
    tr.update(0, whole_tumour_stats(good, target, True))
    tr.update(1, whole_tumour_stats(bad, target, True))
    assert tr.dice().tolist() == pytest.approx([1.0, 2 * 1 / (2 + 2 + 1)])
    w = tr.compute_weights(1.0)
    assert w[0] > w[1]


def test_tracker_state_dict_roundtrip():
    tr = PerformanceTracker(3)
    tr.update(2, [3.0, 1.0, 0.0])
    sd = tr.state_dict()
    tr.update(2, [100.0, 0.0, 0.0])  # must not leak into the saved state
    tr2 = PerformanceTracker(3)
    tr2.load_state_dict(sd)
    assert torch.equal(tr2.stats, torch.tensor([[0, 0, 0], [0, 0, 0], [3, 1, 0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="state has 3 teachers, tracker has 2"):
        PerformanceTracker(2).load_state_dict(sd)


def test_tracker_all_reduce_noop_without_dist():
    tr = PerformanceTracker(2)
    tr.update(0, [1.0, 2.0, 3.0])
    tr.all_reduce()
    assert tr.stats[0].tolist() == [1.0, 2.0, 3.0]


gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                          reason="torch.distributed gloo backend not available")


@gloo
def test_tracker_all_reduce_single_process_gloo():
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        tr = PerformanceTracker(3)
        tr.update(0, [4.0, 1.0, 1.0])
        tr.update(1, [1.0, 3.0, 3.0])
        before, w_before = tr.stats.clone(), tr.compute_weights(0.15)
        tr.all_reduce()
        assert torch.equal(tr.stats, before)
        assert tr.stats.dtype == torch.float64 and tr.stats.device.type == "cpu"
        assert torch.allclose(tr.compute_weights(0.15), w_before)
    finally:
        dist.destroy_process_group()


RANK_STATS = {
    0: [[10.0, 2.0, 3.0], [1.0, 5.0, 5.0], [0.0, 0.0, 4.0]],
    1: [[2.0, 8.0, 0.0], [9.0, 0.0, 1.0], [6.0, 1.0, 1.0]],
}


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        tr = PerformanceTracker(3)
        for i, s in enumerate(RANK_STATS[rank]):
            tr.update(i, s)
        tr.all_reduce()
        torch.save({"stats": tr.stats, "weights": tr.compute_weights(0.15)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@gloo
def test_tracker_all_reduce_two_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    ref = PerformanceTracker(3)
    for r in (0, 1):
        for i, s in enumerate(RANK_STATS[r]):
            ref.update(i, s)
    assert torch.equal(r0["stats"], r1["stats"]) and torch.equal(r0["stats"], ref.stats)
    assert torch.equal(r0["weights"], r1["weights"])
    assert torch.allclose(r0["weights"], ref.compute_weights(0.15))


# ------------------------------------------------------------------------------ CDSFL
def test_cdsfl_fusion_shape_and_gradients():
    torch.manual_seed(4)
    chans = [32, 16, 48]
    # reduction 4 (hidden 8/4/12): with reduction 16 a 16-channel gate has a single hidden
    # ReLU unit that may be dead at init, giving an exactly-zero (but connected) gradient
    fusion = CDSFLFusion(chans, num_outputs=3, conv_op=nn.Conv3d, reduction=4)
    feats = [torch.randn(2, c, 4, 6, 5, requires_grad=True) for c in chans]
    seg_target = torch.randint(0, 2, (2, 3, 4, 6, 5)).float()  # deep-supervision target at this level
    out = fusion(feats)
    assert out.shape == seg_target.shape
    nn.functional.binary_cross_entropy_with_logits(out, seg_target).backward()
    for f in feats:
        assert f.grad is not None and f.grad.abs().sum() > 0
    for name, p in fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_cdsfl_multi_level():
    chans = {1: [32, 32, 32], 2: [64, 64, 64]}
    model = CDSFL([1, 2], chans, num_outputs=4)
    assert set(model.fusions.keys()) == {"1", "2"}
    feats = {1: [torch.randn(1, 32, 8, 8, 8) for _ in range(3)],
             2: [torch.randn(1, 64, 4, 4, 4) for _ in range(3)]}
    out = model(feats)
    assert set(out) == {1, 2}
    assert out[1].shape == (1, 4, 8, 8, 8)
    assert out[2].shape == (1, 4, 4, 4, 4)
    with pytest.raises(ValueError, match=r"CDSFL needs features for level\(s\) \[2\], got levels \[1\]"):
        model({1: feats[1]})


def test_channel_gate_range_and_2d():
    torch.manual_seed(5)
    gate = ChannelGate(8, reduction=16)  # hidden = max(8 // 16, 1) = 1
    x = torch.randn(2, 8, 5, 7)
    y = gate(x)
    assert y.shape == x.shape
    # gate in (0, 1): |y| <= |x| elementwise, same sign
    assert (y.abs() <= x.abs() + 1e-7).all()
    assert torch.equal(torch.sign(y), torch.sign(x))
    fusion2d = CDSFLFusion([8, 4], num_outputs=3, conv_op=nn.Conv2d)
    out = fusion2d([x, torch.randn(2, 4, 5, 7)])
    assert out.shape == (2, 3, 5, 7)


def test_cdsfl_wrong_number_of_features():
    fusion = CDSFLFusion([8, 8, 8], num_outputs=3)
    with pytest.raises(ValueError, match="3 teachers"):
        fusion([torch.randn(1, 8, 2, 2, 2)] * 2)


def test_whole_tumour_channel_beside_a_resection_cavity():
    """WT is the region with the most labels wherever it stands; RC (one label) never wins."""
    from nnunet_kd.training.performance import whole_tumour_channel

    assert whole_tumour_channel([(1, 2, 3), (2, 3), (3,), (4,)]) == 0  # BraTS 2024+ GLI with RC
    assert whole_tumour_channel([(4,), (3,), (2, 3), (1, 2, 3, 4)]) == 3
    assert whole_tumour_channel([1, 2]) == 0 and whole_tumour_channel(None) == 0  # plain labels
    # the stats follow the chosen channel: only channel 3 agrees with the target
    target = torch.zeros(1, 4, 2, 2)
    target[:, 3] = 1
    logits = torch.full((1, 4, 2, 2), -5.0)
    logits[:, 3] = 5.0
    assert whole_tumour_stats(logits, target, True, whole_tumour_channel([(4,), (3,), (2, 3), (1, 2, 3, 4)])
                              ).tolist() == [4.0, 0.0, 0.0]
