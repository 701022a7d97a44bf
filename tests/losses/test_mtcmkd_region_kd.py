"""The default MTCM-KD weighting: per-region weights from the validation Dice lead over the student (known values),
per-channel response KD, the KD ramp, and the CDSFL head learning at full weight while the teachers get 0.08."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from nnunet_kd.losses import (CDSFL, ResponseKD, cdsfl_seg_loss, fuse_with_detached_copy, one_vs_rest_kl_from_logits,
                              response_kd_loss, student_loss_terms)
from nnunet_kd.training.performance import RegionPerformance, dice_from_stats, moving_average, region_kd_weights
from nnunet_kd.training.schedules import kd_rampup

NAN = float("nan")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _binary_kl(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


# ------------------------------------------------------------------------- the rule
def test_teacher_worse_than_the_student_gets_zero_and_a_better_one_the_clipped_gap():
    student = [0.80, 0.70, 0.60]  # WT, TC, ET
    teachers = [[0.90, 0.60, 0.40],   # FLAIR-like: better on WT only
                [0.82, 0.70, 0.61],   # slightly better on WT and ET, equal on TC
                [0.50, 0.50, 0.50]]   # worse everywhere
    w = region_kd_weights(teachers, student, max_weight=0.5 / 3, margin=0.05)
    assert w.dtype == torch.float64 and w.shape == (3, 3)
    m = 0.5 / 3
    expected = [[m, 0.0, 0.0], [m * 0.02 / 0.05, 0.0, m * 0.01 / 0.05], [0.0, 0.0, 0.0]]
    assert torch.allclose(w, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert (w[2] == 0).all()  # exactly 0, not just small


def test_unmeasured_dice_gives_zero_weight_and_bad_settings_raise():
    w = region_kd_weights([[NAN, 0.9]], [0.5, NAN], max_weight=1.0, margin=0.1)
    assert w.tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError, match="margin"):
        region_kd_weights([[0.5]], [0.4], 1.0, 0.0)
    with pytest.raises(ValueError, match="match"):
        region_kd_weights([[0.5, 0.5]], [0.4], 1.0, 0.1)


def test_dice_from_stats_and_moving_average():
    stats = torch.tensor([[4.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # (3, R): rows tp, fp, fn
    d = dice_from_stats(stats)
    assert d[0].item() == pytest.approx(8 / 10) and d[2].item() == pytest.approx(1.0)
    assert math.isnan(d[1].item())  # 2tp + fp + fn = 0: nothing to measure
    first = moving_average(None, torch.tensor([0.5, NAN, 0.2]))
    assert torch.equal(torch.isnan(first), torch.tensor([False, True, False]))
    second = moving_average(first, torch.tensor([1.0, 0.6, NAN]), momentum=0.9)
    assert second.tolist() == pytest.approx([0.9 * 0.5 + 0.1 * 1.0, 0.6, 0.2])


def test_region_performance_zero_before_the_first_validation_then_rule_of_the_moving_averages():
    rp = RegionPerformance(momentum=0.9)
    assert rp.weights(["teacher0"], 0.2, 0.05, 3).tolist() == [[0.0, 0.0, 0.0]]
    # epoch 1: student Dice (0.8, 0.5, 0.5), teacher (0.9, 0.4, 0.52)
    stats = lambda s: torch.tensor(s, dtype=torch.float64).T  # per region (tp, fp, fn) -> (3, R)
    epoch = rp.update({"student": stats([[4, 1, 1], [1, 1, 1], [1, 1, 1]]),
                       "teacher0": stats([[9, 1, 1], [2, 3, 3], [13, 12, 12]])})
    assert epoch["student"].tolist() == pytest.approx([0.8, 0.5, 0.5])
    assert epoch["teacher0"].tolist() == pytest.approx([0.9, 0.4, 0.52])
    w = rp.weights(["teacher0", "cdsfl1"], 0.2, 0.05, 3)
    assert torch.allclose(w, torch.tensor([[0.2, 0.0, 0.2 * 0.02 / 0.05], [0.0, 0.0, 0.0]], dtype=torch.float64))
    # epoch 2: the student catches up on WT (1.0): EMA 0.9 * 0.8 + 0.1 * 1.0 = 0.82 vs the teacher's 0.9
    rp.update({"student": stats([[1, 0, 0], [1, 1, 1], [1, 1, 1]]), "teacher0": stats([[9, 1, 1], [2, 3, 3], [13, 12, 12]])})
    assert rp.ema["student"][0].item() == pytest.approx(0.82)
    assert rp.weights(["teacher0"], 0.2, 0.05, 3)[0, 0].item() == pytest.approx(0.2)  # still >= margin ahead
    state = rp.state_dict()
    rp.update({"student": stats([[1, 0, 0]] * 3), "teacher0": stats([[0, 1, 1]] * 3)})  # must not leak into state
    restored = RegionPerformance()
    restored.load_state_dict(state)
    assert restored.momentum == 0.9 and restored.ema.keys() == {"student", "teacher0"}
    assert restored.ema["student"].tolist() == pytest.approx([0.82, 0.5, 0.5])
    with pytest.raises(KeyError, match="student"):
        rp.update({"teacher0": stats([[1, 0, 0]] * 3)})


RANK_STATS = {  # per rank: (3, R) counts per source
    0: {"student": [[4.0, 1.0], [1.0, 0.0], [1.0, 3.0]], "teacher0": [[9.0, 0.0], [1.0, 1.0], [1.0, 4.0]]},
    1: {"student": [[2.0, 3.0], [0.0, 1.0], [2.0, 0.0]], "teacher0": [[1.0, 2.0], [0.0, 2.0], [2.0, 1.0]]},
}


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rp = RegionPerformance()
        rp.update({k: torch.tensor(v) for k, v in RANK_STATS[rank].items()})
        torch.save({"ema": rp.ema, "weights": rp.weights(["teacher0"], 0.25, 0.05, 2)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo backend")
def test_weights_identical_on_two_ranks_and_taken_from_the_summed_counts(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["weights"], r1["weights"])
    assert all(torch.equal(r0["ema"][k], r1["ema"][k]) for k in ("student", "teacher0"))
    ref = RegionPerformance()
    ref.update({k: torch.tensor(RANK_STATS[0][k]) + torch.tensor(RANK_STATS[1][k]) for k in ("student", "teacher0")})
    # summed counts: student (0.75, 2/3), teacher (5/6, 1/3): full weight on region 0, none on region 1
    assert ref.ema["student"].tolist() == pytest.approx([0.75, 2 / 3])
    assert ref.ema["teacher0"].tolist() == pytest.approx([5 / 6, 1 / 3])
    assert torch.allclose(r0["weights"], ref.weights(["teacher0"], 0.25, 0.05, 2))
    assert r0["weights"].tolist() == [[0.25, 0.0]]


# -------------------------------------------------------------------- per-channel KD
def test_region_channel_weights_weight_each_region_bernoulli_kl():
    t = torch.tensor([2.0, -1.0, 0.5]).view(1, 3, 1, 1, 1)
    s = torch.tensor([0.0, 1.0, 0.5]).view(1, 3, 1, 1, 1)
    T = 2.0
    per_region = [_binary_kl(_sigmoid(a / T), _sigmoid(b / T)) * T ** 2 for a, b in [(2.0, 0.0), (-1.0, 1.0), (0.5, 0.5)]]
    got = response_kd_loss(s, t, T, True, 2, channel_weights=torch.tensor([0.3, 0.0, 1.0]))
    assert got.item() == pytest.approx(0.3 * per_region[0], rel=1e-5)
    uniform = response_kd_loss(s, t, T, True, 2, channel_weights=torch.full((3,), 0.2))
    assert uniform.item() == pytest.approx(0.2 * response_kd_loss(s, t, T, True, 2).item(), rel=1e-6)
    with pytest.raises(ValueError, match="channels"):
        response_kd_loss(s, t, T, True, 2, channel_weights=torch.ones(2))


def test_label_channel_weights_use_one_vs_rest_kl_of_the_softmax():
    t = torch.tensor([2.0, 0.0, -1.0]).view(1, 3, 1, 1)
    s = torch.tensor([0.0, 1.0, 0.5]).view(1, 3, 1, 1)
    T = 2.0
    p, q = torch.softmax(t.flatten() / T, 0).tolist(), torch.softmax(s.flatten() / T, 0).tolist()
    w = [0.0, 0.5, 0.25]
    expected = T * sum(wc * _binary_kl(pc, qc) for wc, pc, qc in zip(w, p, q))
    assert response_kd_loss(s, t, T, False, 1, channel_weights=torch.tensor(w)).item() == pytest.approx(expected, rel=1e-5)
    # every class term is >= 0 and 0 when the student matches: weights never push a class to 0
    kl = one_vs_rest_kl_from_logits(torch.randn(2, 4, 3, 3) * 3, torch.randn(2, 4, 3, 3) * 3)
    assert (kl > -1e-6).all()
    same = torch.randn(1, 4, 2, 2)
    assert one_vs_rest_kl_from_logits(same, same).abs().max() < 1e-6
    assert torch.isfinite(response_kd_loss(torch.full((1, 3, 2, 2), -1e4), torch.full((1, 3, 2, 2), 1e4), 1.0, False,
                                           channel_weights=torch.ones(3)))


def test_kd_rampup_known_values():
    assert [kd_rampup(e, 1, 10) for e in (0, 1, 2, 5, 10, 11, 500)] == pytest.approx([0, 0.1, 0.2, 0.5, 1.0, 1.0, 1.0])
    assert kd_rampup(0, 1, 0) == 0.0 and kd_rampup(1, 1, 0) == 1.0 and kd_rampup(3, 1, 1) == 1.0


def _region_seg_loss(out, target):
    return nn.functional.binary_cross_entropy_with_logits(out, target)


class _DSLoss(nn.Module):
    """A deep-supervision wrapper shaped like nnU-Net's: ``loss`` is the single-level loss."""

    def __init__(self):
        super().__init__()
        self.loss = _region_seg_loss

    def forward(self, outs, targets):
        return sum(0.5 ** i * self.loss(o, t) for i, (o, t) in enumerate(zip(outs, targets)))


def test_student_terms_with_channel_weights_supervision_1_and_ramp():
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, 3, 4, 4, 4), (1, 3, 2, 2, 2)]
    out = [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]
    target = [(torch.rand(s, generator=gen) > 0.5).float() for s in shapes]
    teachers = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(2)]
    fused = {1: torch.randn(shapes[1], generator=gen)}
    kd, seg = ResponseKD(2.0, 2, "mean", True), _DSLoss()
    w = [torch.tensor([0.2, 0.0, 0.1], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    v = {1: torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)}
    terms = student_loss_terms(out, teachers, fused, target, seg_loss=seg, kd=kd, kd_weights=w, levels=(1,),
                               kd_active=True, seg_weight=1.0, ds_weight=0.1, ds_seg_fraction=0.0, ds_kd_fraction=0.3,
                               kd_scale=0.1, cdsfl_kd_weights=v)
    assert torch.equal(terms["supervised"], seg(out, target))  # nnU-Net's loss at weight 1, nothing else
    expected_kd = 0.1 * kd(out[0], teachers[0][0], w[0])  # teacher 1 has weight 0 everywhere: no term
    assert torch.isclose(terms["response_kd"], expected_kd, rtol=1e-6)
    assert torch.isclose(terms["cdsfl_kd"], 0.1 * 0.03 * kd(out[1], fused[1], v[1]), rtol=1e-6)
    # all weights 0: the KD terms are plain zeros and give no gradient
    zero = student_loss_terms(out, teachers, fused, target, seg_loss=seg, kd=kd, kd_weights=[torch.zeros(3)] * 2,
                              levels=(1,), kd_active=True, seg_weight=1.0, ds_weight=0.1, ds_seg_fraction=0.0,
                              ds_kd_fraction=0.3, kd_scale=1.0, cdsfl_kd_weights={1: torch.zeros(3)})
    assert zero["response_kd"] == 0 and zero["cdsfl_kd"] == 0 and not torch.is_tensor(zero["response_kd"])


# ------------------------------------------------------------------- CDSFL head weight
def test_cdsfl_head_learns_at_full_weight_and_teachers_get_only_their_share():
    torch.manual_seed(0)
    teachers = [nn.Conv3d(2, 8, 1), nn.Conv3d(2, 8, 1)]  # stand-ins producing the teachers' features
    cdsfl = CDSFL([1], {1: [8, 8]}, num_outputs=3, reduction=2)
    x = torch.randn(2, 2, 4, 4, 4)
    target = [None, (torch.rand(2, 3, 4, 4, 4) > 0.5).float()]

    def grads(loss):
        params = [p for m in teachers + [cdsfl] for p in m.parameters()]
        g = torch.autograd.grad(loss, params, allow_unused=True)
        n = sum(1 for m in teachers for _ in m.parameters())
        return g[:n], g[n:]

    feats = {1: [t(x) for t in teachers]}
    fused, from_detached = fuse_with_detached_copy(cdsfl, feats)
    assert torch.allclose(fused[1], from_detached[1]) and fused[1].shape == (2, 3, 4, 4, 4)
    teacher_grads, head_grads = grads(cdsfl_seg_loss(_region_seg_loss, fused, target, 0.08, from_detached))
    # the same loss through one non-detached path at weight 1 (head reference) and at 0.08 (teacher reference)
    plain = {1: cdsfl({1: [t(x) for t in teachers]})[1]}
    ref_teacher, _ = grads(cdsfl_seg_loss(_region_seg_loss, plain, target, 0.08))
    plain = {1: cdsfl({1: [t(x) for t in teachers]})[1]}
    _, ref_head = grads(cdsfl_seg_loss(_region_seg_loss, plain, target, 1.0))
    for g, r in zip(head_grads, ref_head):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-8)
    for g, r in zip(teacher_grads, ref_teacher):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-9)
    assert all(g.abs().sum() > 0 for g in teacher_grads)
    # the loss value is that of the fused output at weight 1
    assert cdsfl_seg_loss(_region_seg_loss, fused, target, 0.08, from_detached).item() == pytest.approx(
        _region_seg_loss(fused[1], target[1]).item(), rel=1e-6)
